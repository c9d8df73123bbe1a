"""Monitor tab: live training curves, expert-load heatmap with a step slider to replay how the load
evolved, and a per-layer imbalance indicator, all read from the run's metrics.jsonl."""

from __future__ import annotations

import gradio as gr

from .context import UIContext
from .paths import UnsafePathError
from .plots import IMBALANCE_HEADERS, imbalance_figure, imbalance_rows, load_heatmap, training_curves
from .runs import state_label

REFRESH_SECONDS = 2.0


def _load_points(records: list[dict]) -> list[dict]:
    """The logged records that carry an expert load (empty dicts for plain LoRA are skipped)."""
    return [r for r in records if isinstance(r.get("expert_load"), dict) and r["expert_load"]]


def status_markdown(info: dict, records: list[dict], eval_result: dict | None) -> str:
    state = info.get("state", "unknown")
    parts = [f"**{info['name']}** · state **{state_label(info)}**"]
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

    def load_view(name: str, index: float | None, follow_latest: bool) -> dict:
        """The step slider, heatmap, imbalance chart and table of one logged step (the latest when following)."""
        info = ctx.runs.status(name)
        points = _load_points(ctx.runs.metrics(name))
        if not points:
            return {
                step: gr.update(maximum=1, value=0),
                heatmap: load_heatmap({}, None),
                imbalance: imbalance_figure({}),
                table: [],
            }
        last = len(points) - 1
        index = last if follow_latest or index is None else max(0, min(int(index), last))
        point = points[index]
        method = info.get("method") or point.get("method")
        return {
            step: gr.update(
                maximum=max(last, 1),
                value=index,
                label=f"Logged step to show (drag to replay): step {point.get('step')}",
            ),
            heatmap: load_heatmap(point["expert_load"], point.get("step"), method),
            imbalance: imbalance_figure(point["expert_load"], method),
            table: imbalance_rows(point["expert_load"]),
        }

    def refresh(name: str | None, index: float | None, follow_latest: bool, previous, force: bool = False) -> dict:
        """Updates for the run's view; empty when there is no run or nothing changed since ``previous``."""
        if not name:
            return {}
        try:
            signature = (name, ctx.runs.metrics_signature(name))
            if not force and signature == previous:
                return {}
            info = ctx.runs.status(name)
            records = ctx.runs.metrics(name)
            view = load_view(name, index, follow_latest)
        except (OSError, UnsafePathError) as exc:
            return {status: f"**Error:** {exc}", seen: previous}
        title = f"{name} ({info.get('method') or ''})"
        return {
            status: status_markdown(info, records, ctx.runs.eval_result(name)),
            curves: training_curves(records, title),
            **view,
            seen: signature,
        }

    def show(name: str | None, index: float | None, follow_latest: bool, previous):
        """The run dropdown and Refresh now: redraw the run's view even if its files did not change."""
        return refresh(name, index, follow_latest, previous, force=True) or gr.skip()

    outputs = [status, curves, step, heatmap, imbalance, table, seen]
    run.change(show, [run, step, follow, seen], outputs, api_name="monitor")
    refresh_button.click(show, [run, step, follow, seen], outputs, api_visibility="private")

    def replay(name: str | None, index: float | None):
        if not name:
            return gr.skip()
        return {**load_view(name, index, False), follow: False}

    step.release(replay, [run, step], [step, heatmap, imbalance, table, follow], api_name="replay")
    timer = gr.Timer(REFRESH_SECONDS)

    known_runs = gr.State(runs)

    def tick(name: str | None, index: float | None, follow_latest: bool, previous, live_on: bool, known: list[str]):
        choices = ctx.runs.list_runs()
        updates = {known_runs: choices}
        if choices != known:  # only touch the dropdown when the list changed (an update closes it under the pointer)
            updates[run] = gr.update(choices=choices)
        if live_on:
            updates.update(refresh(name, index, follow_latest, previous))
        return updates

    timer.tick(
        tick,
        [run, step, follow, seen, live, known_runs],
        [run, known_runs] + outputs,
        api_visibility="private",
        show_progress="hidden",
    )
    return {"run": run}
