"""Monitor tab: live training curves, expert-load heatmap with a step slider to replay how the load
evolved, and a per-layer imbalance indicator, all read from the run's metrics.jsonl."""

from __future__ import annotations

import gradio as gr

from .context import UIContext
from .paths import UnsafePathError
from .plots import IMBALANCE_HEADERS, imbalance_figure, imbalance_rows, load_heatmap, training_curves

REFRESH_SECONDS = 2.0


def _load_points(records: list[dict]) -> list[dict]:
    """The logged records that carry an expert load (empty dicts for plain LoRA are skipped)."""
    return [r for r in records if isinstance(r.get("expert_load"), dict) and r["expert_load"]]


def status_markdown(info: dict, records: list[dict], eval_result: dict | None) -> str:
    state = info.get("state", "unknown")
    parts = [f"**{info['name']}** · state **{state}**"]
    if info.get("step") is not None:
        parts.append(f"step {info['step']}" + (f"/{info['max_steps']}" if info.get("max_steps") else ""))
    for key, label in (("stage", "stage"), ("method", "method")):
        if info.get(key):
            parts.append(f"{label} {info[key]}")
    if info.get("trainable_parameters"):
        parts.append(f"{int(info['trainable_parameters']):,} trainable parameters")
    if records:
        last = records[-1]
        if isinstance(last.get("loss"), (int, float)):
            parts.append(f"loss {last['loss']:.4f}")
        if isinstance(last.get("tokens_per_s"), (int, float)):
            parts.append(f"{last['tokens_per_s']:.0f} tokens/s")
    if eval_result and isinstance(eval_result.get("accuracy"), (int, float)):
        n, task = eval_result.get("n", "?"), eval_result.get("task", "")
        parts.append(f"eval accuracy {eval_result['accuracy']:.1%} on {n} ({task})")
    text = " · ".join(parts)
    if info.get("error") and state == "failed":
        text += f"\n\n**Error:** `{info['error']}`"
    return text


def build_monitor_tab(ctx: UIContext) -> dict:
    runs = ctx.runs.list_runs()
    with gr.Row():
        run = gr.Dropdown(choices=runs, value=runs[0] if runs else None, label="Run", elem_id="monitor-run", scale=3)
        live = gr.Checkbox(value=True, label=f"Live refresh (every {REFRESH_SECONDS:.0f} s)", scale=1)
        refresh_button = gr.Button("Refresh now", scale=1)
    status = gr.Markdown(elem_id="monitor-status")
    curves = gr.Plot(label="Training curves", show_label=False, elem_id="monitor-curves", format="png")
    gr.Markdown("### Expert load")
    step = gr.Slider(
        minimum=0,
        maximum=1,
        value=0,
        step=1,
        label="Logged step to show (drag to replay)",
        elem_id="monitor-step",
        interactive=True,
    )
    follow = gr.Checkbox(value=True, label="Follow the latest step")
    with gr.Row():
        heatmap = gr.Plot(
            label="Expert load heatmap (layers × experts)",
            show_label=False,
            elem_id="monitor-heatmap",
            format="png",
            scale=3,
        )
        imbalance = gr.Plot(
            label="Imbalance per layer", show_label=False, elem_id="monitor-imbalance", format="png", scale=2
        )
    table = gr.Dataframe(
        headers=IMBALANCE_HEADERS, interactive=False, label="Imbalance per layer", elem_id="monitor-imbalance-table"
    )
    seen = gr.State(None)  # (run, file signature) last drawn, so an idle refresh redraws nothing

    def load_view(name, index, follow_latest):
        """Heatmap, imbalance chart and table of one logged step; returns (index used, outputs...)."""
        info = ctx.runs.status(name)
        points = _load_points(ctx.runs.metrics(name))
        if not points:
            empty = load_heatmap({}, None)
            return gr.update(maximum=1, value=0), empty, imbalance_figure({}), []
        last = len(points) - 1
        index = last if follow_latest or index is None else max(0, min(int(index), last))
        point = points[index]
        method = info.get("method") or point.get("method")
        return (
            gr.update(
                maximum=max(last, 1),
                value=index,
                label=f"Logged step to show (drag to replay): step {point.get('step')}",
            ),
            load_heatmap(point["expert_load"], point.get("step"), method),
            imbalance_figure(point["expert_load"], method),
            imbalance_rows(point["expert_load"]),
        )

    def refresh(name, index, follow_latest, previous, force=False):
        if not name:
            return [gr.skip()] * 7
        try:
            signature = (name, ctx.runs.metrics_signature(name))
            if not force and signature == previous:
                return [gr.skip()] * 7
            info = ctx.runs.status(name)
            records = ctx.runs.metrics(name)
            view = load_view(name, index, follow_latest)
        except (OSError, UnsafePathError) as exc:
            return [f"**Error:** {exc}"] + [gr.skip()] * 5 + [previous]
        title = f"{name} ({info.get('method') or ''})"
        return [
            status_markdown(info, records, ctx.runs.eval_result(name)),
            training_curves(records, title),
            *view,
            signature,
        ]

    outputs = [status, curves, step, heatmap, imbalance, table, seen]
    run.change(
        lambda n, i, f, p: refresh(n, i, f, p, force=True), [run, step, follow, seen], outputs, api_name="monitor"
    )
    refresh_button.click(
        lambda n, i, f, p: refresh(n, i, f, p, force=True), [run, step, follow, seen], outputs, api_visibility="private"
    )

    def replay(name, index):
        if not name:
            return [gr.skip()] * 5
        slider, heat, imb, rows = load_view(name, index, False)
        return slider, heat, imb, rows, False

    step.release(replay, [run, step], [step, heatmap, imbalance, table, follow], api_name="replay")
    timer = gr.Timer(REFRESH_SECONDS)

    known_runs = gr.State(runs)

    def tick(name, index, follow_latest, previous, live_on, known):
        choices = ctx.runs.list_runs()
        # only touch the dropdown when the list changed (an update closes it under the user's pointer)
        run_update = gr.skip() if choices == known else gr.update(choices=choices)
        if not live_on:
            return [run_update, choices] + [gr.skip()] * 7
        return [run_update, choices] + refresh(name, index, follow_latest, previous)

    timer.tick(
        tick,
        [run, step, follow, seen, live, known_runs],
        [run, known_runs] + outputs,
        api_visibility="private",
        show_progress="hidden",
    )
    return {"run": run}
