"""Compare tab: several runs side by side: loss curves overlaid, final eval accuracy, trainable
parameters, throughput."""

from __future__ import annotations

import statistics

import gradio as gr

from .context import UIContext
from .paths import UnsafePathError
from .plots import compare_curves

COMPARE_HEADERS = [
    "run",
    "method",
    "state",
    "steps",
    "final loss",
    "eval accuracy",
    "eval examples",
    "trainable parameters",
    "mean tokens/s",
    "peak memory (MB)",
]


def compare_rows(ctx: UIContext, names: list[str]) -> tuple[list[list], dict[str, list[dict]]]:
    rows, curves = [], {}
    for name in names or []:
        try:
            info = ctx.runs.status(name)
            records = ctx.runs.metrics(name)
            result = ctx.runs.eval_result(name) or {}
        except (OSError, UnsafePathError):
            continue
        curves[f"{name} ({info.get('method') or '?'})"] = records  # legend label says the method too
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        speeds = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), (int, float))]
        memory = [r["peak_mem_mb"] for r in records if isinstance(r.get("peak_mem_mb"), (int, float))]
        accuracy = result.get("accuracy")
        params = info.get("trainable_parameters")
        rows.append(
            [
                name,
                info.get("method") or "",
                info["state"],
                records[-1].get("step", "") if records else "",
                f"{losses[-1]:.4f}" if losses else "",
                f"{accuracy:.1%}" if isinstance(accuracy, (int, float)) else "not evaluated",
                result.get("n", ""),
                f"{int(params):,}" if isinstance(params, (int, float)) else "",
                f"{statistics.fmean(speeds):.0f}" if speeds else "",
                f"{max(memory):.0f}" if memory else "",
            ]
        )
    return rows, curves


def build_compare_tab(ctx: UIContext) -> dict:
    runs = ctx.runs.list_runs()
    with gr.Row():
        selected = gr.Dropdown(
            choices=runs, value=runs[:2], multiselect=True, label="Runs to compare", elem_id="compare-runs", scale=4
        )
        refresh_button = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-button")
    curves = gr.Plot(label="Loss curves", show_label=False, elem_id="compare-curves", format="png")
    table = gr.Dataframe(
        headers=COMPARE_HEADERS, interactive=False, label="Runs side by side", wrap=True, elem_id="compare-table"
    )

    def compare(names: list[str] | None):
        rows, series = compare_rows(ctx, names)
        return compare_curves(series), rows

    def refresh_choices(names: list[str] | None):
        choices = ctx.runs.list_runs()
        return gr.update(choices=choices, value=[n for n in (names or []) if n in choices])

    refresh_button.click(compare, selected, [curves, table], api_name="compare")
    selected.change(compare, selected, [curves, table], api_visibility="private")
    return {"runs": selected, "refresh_choices": refresh_choices}
