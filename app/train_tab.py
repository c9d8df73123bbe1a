"""Train tab: pick a shipped recipe, edit the fields that matter, preview the resolved YAML, launch
``qmoe finetune`` as a subprocess, stop it, and see every run's state."""

from __future__ import annotations

import time

import gradio as gr

from qmoe import rundir
from qmoe.config import METHODS
from qmoe.errors import UsageError
from qmoe.recipe import RecipeError

from .context import UIContext
from .data_preview import TRAINED, recipe_data_preview
from .memory_estimate import memory_estimate
from .paths import UnsafePathError, list_recipes
from .recipe_form import (
    FIELDS,
    build_recipe,
    field_info,
    method_field_values,
    method_uses,
    recipe_form_values,
)
from .runs import state_label

RUN_HEADERS = ["run", "state", "step", "method", "started", "last error"]


def runs_table(ctx: UIContext) -> list[list]:
    rows = []
    for name in ctx.runs.list_runs():
        try:
            info = ctx.runs.status(name)
        except (OSError, UnsafePathError):
            continue
        step = info.get("step")
        max_steps = info.get("max_steps")
        progress = "" if step is None else (f"{step}/{max_steps}" if max_steps else str(step))
        started = info.get("started")
        if isinstance(started, (int, float)):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        elif isinstance(started, str):  # ISO 8601 from the pipeline: date and time are enough here
            started = started[:19].replace("T", " ")
        state = state_label(info)
        rows.append(
            [
                name,
                state,
                progress,
                info.get("method") or "",
                started or "",
                info.get("error") or "",
            ]
        )
    return rows


def _form_dict(values) -> dict:
    return {field.key: value for field, value in zip(FIELDS, values, strict=False)}


def _ok(message: str) -> str:
    return f"**OK:** {message}"


def _refused(message: str) -> str:
    return f"**Refused:** {message}"


def build_train_tab(ctx: UIContext) -> dict:
    """Lay out the tab (inside an open ``gr.Tab``) and wire its events; returns the components other tabs
    link to."""
    recipes = list_recipes()
    first = recipes[0] if recipes else None
    _, initial = recipe_form_values(first) if first else (None, {})
    method0 = initial.get("adapter.method", "moelora")
    inputs: dict[str, gr.components.Component] = {}

    def make(field, **extra):
        value = initial.get(field.key)
        info = field_info(field.key, method0)
        common = dict(label=field.label, info=info, elem_id=f"field-{field.key.replace('.', '-')}")
        if field.key == "model.source":
            return gr.Dropdown(choices=ctx.model_choices(), value=value, allow_custom_value=True, **common)
        if field.kind == "choice":
            return gr.Dropdown(choices=list(METHODS), value=value, **common)
        if field.kind == "bool":
            return gr.Checkbox(value=bool(value), **common)
        if field.kind == "int":
            return gr.Number(value=value, precision=0, **common, **extra)
        return gr.Number(value=value, **common, **extra)

    gr.Markdown(
        "Start a fine-tune without writing YAML: choose a shipped recipe, adjust the fields below (each shows "
        "its valid range and default), preview the resolved recipe, launch. Training runs as a separate "
        f"process in `{ctx.runs.runs_dir}`: closing the browser does not stop it."
    )
    with gr.Row():
        recipe = gr.Dropdown(
            choices=recipes, value=first, label="Recipe (from recipes/)", elem_id="train-recipe", scale=2
        )
        reload_button = gr.Button("Reset fields to the recipe", scale=1)
    groups = (
        ("Model and adapter", ("model.", "adapter.")),
        ("Optimization", ("train.",)),
        ("Data and evaluation", ("data.", "eval.")),
    )
    with gr.Row():
        for title, prefixes in groups:
            with gr.Column():
                gr.Markdown(f"#### {title}")
                for field in FIELDS:
                    if field.key.startswith(prefixes):
                        component = make(field)
                        if field.key.startswith("adapter.") and field.key != "adapter.method":
                            component.visible = method_uses(method0, field.key.split(".", 1)[1]) or field.key in (
                                "adapter.r",
                                "adapter.alpha",
                            )
                        inputs[field.key] = component
    form = [inputs[f.key] for f in FIELDS]
    with gr.Row():
        preview_button = gr.Button("Preview resolved YAML", elem_id="train-preview")
        data_button = gr.Button("Preview data", elem_id="train-data-preview")
        launch_button = gr.Button("Launch training", variant="primary", elem_id="train-launch")
    message = gr.Markdown(elem_id="train-message")
    estimate = gr.Markdown(elem_id="train-memory-estimate")
    with gr.Accordion("Resolved recipe (what qmoe finetune will run)", open=False) as preview_box:
        preview = gr.Code(language="yaml", label=rundir.RECIPE, elem_id="train-yaml", interactive=False)
    with gr.Accordion("Training data (what qmoe data prints)", open=False) as data_box:
        data_summary = gr.Markdown(elem_id="train-data-summary")
        data_examples = gr.HighlightedText(
            label="First examples as the model sees them (trained-on tokens highlighted)",
            color_map={TRAINED: "green"},
            combine_adjacent=True,
            elem_id="train-data-examples",
        )

    gr.Markdown("### Runs")
    runs = gr.Dataframe(
        value=runs_table(ctx),
        headers=RUN_HEADERS,
        interactive=False,
        wrap=True,
        elem_id="train-runs",
        label="Runs (refreshes every few seconds)",
    )
    with gr.Row():
        run_choice = gr.Dropdown(choices=ctx.runs.list_runs(), label="Run", elem_id="train-run-choice", scale=3)
        stop_button = gr.Button(
            "Stop run (SIGTERM, saves a checkpoint) or cancel a queued one",
            variant="stop",
            elem_id="train-stop",
            scale=1,
        )
    stop_message = gr.Markdown()
    log_tail = gr.Textbox(
        label="Log tail of the selected run", lines=8, max_lines=16, interactive=False, elem_id="train-log"
    )

    # ---- events ------------------------------------------------------------------------------------------
    def load_recipe_fields(name: str | None):
        try:
            _, values = recipe_form_values(name)
        except (RecipeError, UnsafePathError) as exc:
            return {message: _refused(str(exc))}
        method = values["adapter.method"]
        updates = {message: ""}
        for field in FIELDS:
            if field.key.startswith("adapter.") and field.key != "adapter.method":
                name_ = field.key.split(".", 1)[1]
                update = gr.update(
                    value=values[field.key], info=field_info(field.key, method), visible=method_uses(method, name_)
                )
            elif field.key == "model.source":
                update = gr.update(value=values[field.key], choices=ctx.model_choices())
            else:
                update = gr.update(value=values[field.key])
            updates[inputs[field.key]] = update
        return updates

    def change_method(name: str | None, method: str | None):
        if method not in METHODS or not name:
            return gr.skip()
        values = method_field_values(name, method)
        return {
            inputs[f.key]: gr.update(
                value=values[f.key], visible=method_uses(method, f.key.split(".", 1)[1]), info=field_info(f.key, method)
            )
            for f in adapter_fields
        }

    def preview_recipe(name: str | None, *values):
        try:
            _, text = build_recipe(
                name, _form_dict(values), ctx.models_dir, str(ctx.runs.runs_dir / f"{name}-<launch time>-<id>")
            )
        except (RecipeError, UnsafePathError) as exc:
            return {message: _refused(str(exc))}
        return {message: _ok("valid recipe"), preview: text, preview_box: gr.update(open=True)}

    def preview_data(name: str | None, *values):
        try:
            recipe_, _ = build_recipe(name, _form_dict(values), ctx.models_dir, str(ctx.runs.runs_dir / "preview"))
            summary, examples = recipe_data_preview(recipe_)
        except (UsageError, UnsafePathError) as exc:  # RecipeError and bad data (DataError) are UsageErrors
            return {message: _refused(str(exc))}
        return {
            message: _ok("data loaded"),
            data_summary: summary,
            data_examples: examples,
            data_box: gr.update(open=True),
        }

    def update_estimate(name: str | None, *values):
        try:
            recipe_, _ = build_recipe(name, _form_dict(values), ctx.models_dir, str(ctx.runs.runs_dir / "estimate"))
        except (RecipeError, UnsafePathError):
            return ""  # the form's own message says what is wrong
        return memory_estimate(recipe_).markdown

    def launch(name: str | None, held_text: str | None, *values):
        form_values = _form_dict(values)
        try:
            recipe_, check_text = build_recipe(name, form_values, ctx.models_dir, str(ctx.runs.runs_dir / "check"))
        except (RecipeError, UnsafePathError) as exc:
            return {message: _refused(str(exc))}
        # predicted not to fit the detected GPU: the first click holds the launch, a second one confirms it
        est = memory_estimate(recipe_)
        if est.too_big and held_text != check_text:
            return {
                message: f"**Not launched yet:** {est.markdown.removeprefix('**Memory estimate:** ')} Press Launch "
                "again to start it anyway.",
                held: check_text,
            }
        # the recipe names its own run directory, so create that first (unique even for simultaneous launches)
        run_dir = ctx.runs.new_run_dir(name)
        _, text = build_recipe(name, form_values, ctx.models_dir, str(run_dir))
        run_name = ctx.runs.launch_in(run_dir, text)
        position = ctx.runs.queue_position(run_name)
        if position is None:
            note = f"launched **{run_name}**: follow it in the Monitor tab"
        else:  # one training per device: this one waits for the run(s) ahead of it
            device = ctx.runs.device_of(run_name)
            note = (
                f"queued **{run_name}** (position {position}): another run is training on {device}; it starts "
                "when the device frees. Follow it in the Monitor tab; Stop cancels it"
            )
        return {
            message: _ok(note),
            preview: text,
            runs: runs_table(ctx),
            run_choice: gr.update(choices=ctx.runs.list_runs(), value=run_name),
            launched_run: run_name,
            held: None,
        }

    def refresh_runs(selected: str | None, known: list[str]):
        choices = ctx.runs.list_runs()
        updates = {
            runs: runs_table(ctx),
            log_tail: ctx.runs.log_tail(selected, 20) if selected in choices else "",
            known_runs: choices,
        }
        if choices != known:  # only touch the dropdown when the list changed (an update closes it under the pointer)
            updates[run_choice] = gr.update(choices=choices)
        return updates

    def stop(selected: str | None) -> str:
        if not selected:
            return "choose a run to stop"
        try:
            return ctx.runs.stop(selected)
        except UnsafePathError as exc:
            return _refused(str(exc))

    adapter_fields = [f for f in FIELDS if f.key.startswith("adapter.") and f.key != "adapter.method"]
    launched_run = gr.State(None)
    held = gr.State(None)  # the recipe of a launch held for confirmation (predicted not to fit the GPU)
    recipe.change(load_recipe_fields, recipe, form + [message], api_name="recipe_fields")
    reload_button.click(load_recipe_fields, recipe, form + [message], api_visibility="private")
    inputs["adapter.method"].input(
        change_method,
        [recipe, inputs["adapter.method"]],
        [inputs[f.key] for f in adapter_fields],
        api_visibility="private",
    )
    preview_button.click(preview_recipe, [recipe] + form, [message, preview, preview_box], api_name="preview")
    data_outputs = [message, data_summary, data_examples, data_box]
    data_button.click(preview_data, [recipe] + form, data_outputs, api_name="preview_data")
    # one launch/stop at a time (concurrency_id "runs"): the run queue changes in order
    # the estimate follows the form (planning reuses the model built on meta; only the last change counts)
    for component in [recipe, *form]:
        component.change(
            update_estimate,
            [recipe] + form,
            estimate,
            api_visibility="private",
            trigger_mode="always_last",
            show_progress="hidden",
        )
    launch_button.click(
        launch,
        [recipe, held] + form,
        [message, preview, runs, run_choice, launched_run, held],
        api_name="launch",
        concurrency_limit=1,
        concurrency_id="runs",
    )
    stop_button.click(stop, run_choice, stop_message, api_name="stop", concurrency_limit=1, concurrency_id="runs")
    run_choice.change(lambda s: ctx.runs.log_tail(s, 20) if s else "", run_choice, log_tail, api_visibility="private")
    timer = gr.Timer(3.0)
    known_runs = gr.State(ctx.runs.list_runs())
    timer.tick(
        refresh_runs,
        [run_choice, known_runs],
        [runs, run_choice, log_tail, known_runs],
        api_name="runs",
        show_progress="hidden",
    )
    return {"launched_run": launched_run, "run_choice": run_choice}
