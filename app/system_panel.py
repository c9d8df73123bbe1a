"""System panel: what ``qmoe doctor`` finds on the machine serving the UI (GPU, 4-bit, kernels, versions,
builtin model, offline data, free disk), checked when the panel is opened or "Check again" is pressed."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from qmoe.doctor import Check, healthy, run_checks

from .context import UIContext


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def system_markdown(checks: list[Check]) -> str:
    """The checks as a Markdown table, with the verdict qmoe doctor's exit status gives."""
    verdict = (
        "**Ready:** every check the main job needs passed."
        if healthy(checks)
        else "**Broken:** " + ", ".join(c.name for c in checks if c.required and not c.ok) + " (see the fix column)."
    )
    rows = [
        f"| {'✓' if c.ok else '✗'} | {_cell(c.name)}{'' if c.required else ' (optional)'} | {_cell(c.detail)} "
        f"| {_cell(c.fix) if not c.ok else ''} |"
        for c in checks
    ]
    return "\n".join([verdict, "", "| | check | found | fix |", "|---|---|---|---|", *rows])


def check_system(runs_dir: Path) -> str:
    return system_markdown(run_checks(runs_dir))


def build_system_panel(ctx: UIContext) -> dict:
    with gr.Accordion("System", open=False, elem_id="system-panel") as panel:
        report = gr.Markdown("Open this panel to check the machine (the same checks as `qmoe doctor`).")
        again = gr.Button("Check again", size="sm", elem_id="system-check")

    def check() -> str:
        return check_system(ctx.runs.runs_dir)

    panel.expand(check, None, report, api_visibility="private")
    again.click(check, None, report, api_name="system")
    return {"panel": panel, "report": report}
