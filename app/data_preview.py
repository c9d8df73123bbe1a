"""The Train tab's "Preview data" panel: the same report and masked examples as ``qmoe data`` (one function,
:func:`qmoe.dataprep.data_preview`), shaped for Gradio: a Markdown summary and HighlightedText runs."""

from __future__ import annotations

from qmoe.dataprep import DataPreview, data_preview, require_trainable
from qmoe.errors import UsageError
from qmoe.recipe import Recipe

TRAINED = "trained on"
SHOWN = 3


def preview_markdown(preview: DataPreview) -> str:
    lines = [f"- {line}" for line in preview.report.lines()]
    try:
        require_trainable(preview.report)
    except UsageError as exc:
        lines.append(f"- **Would refuse to train:** {exc}")
    return "\n".join(lines)


def preview_highlights(preview: DataPreview) -> list[tuple[str, str | None]]:
    """(text, label) runs for ``gr.HighlightedText``: the trained-on tokens labelled, examples separated."""
    runs: list[tuple[str, str | None]] = []
    for i, segments in enumerate(preview.examples):
        runs.append((f"{'' if i == 0 else chr(10) * 2}── example {i + 1} ──\n", None))
        runs.extend((text, TRAINED if trained else None) for text, trained in segments)
    return runs


def recipe_data_preview(recipe: Recipe, show: int = SHOWN) -> tuple[str, list[tuple[str, str | None]]]:
    """(summary Markdown, highlighted examples) of what ``recipe`` trains on."""
    preview = data_preview(recipe, show=show)
    return preview_markdown(preview), preview_highlights(preview)
