"""The qmoe web UI: assembles the four tabs into one Gradio app.

``qmoe ui`` calls :func:`launch`. For development with auto-reload run ``gradio app/main.py`` from the
repository root (it serves the module-level ``demo``; set ``QMOE_RUNS_DIR`` to choose the runs folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from qmoe_app.auth import Accounts, LoginRequired
from qmoe_app.chat_tab import build_chat_tab
from qmoe_app.compare_tab import build_compare_tab
from qmoe_app.context import UIContext
from qmoe_app.monitor_tab import build_monitor_tab
from qmoe_app.paths import default_models_dir, default_runs_dir
from qmoe_app.runs import RunManager
from qmoe_app.system_panel import build_system_panel
from qmoe_app.train_tab import build_train_tab

CSS_PATH = Path(__file__).with_name("style.css")

# Gradio's queue, set deliberately (its default runs each event listener one call at a time for all users
# together, so 8 browsers' monitor refreshes would wait on each other): events without their own limit
# (reading run folders, drawing plots) run up to 4 at once, enough that one slow plot does not stall the other
# clients while bounding the threads and figures in memory; chat generation (one loaded model) and launch/
# stop/cancel (the run queue) set their own limit of 1 in their tabs. At most 64 events wait, so a burst of
# clients cannot grow the server's memory without bound: beyond that Gradio answers "queue full".
DEFAULT_CONCURRENCY = 4
MAX_QUEUED_EVENTS = 64


def build_app(
    runs_dir: str | Path | None = None, models_dir: str | Path | None = None, runs: RunManager | None = None
) -> gr.Blocks:
    """The UI for the runs in ``runs_dir`` (or those of ``runs``, an existing RunManager: tests give one
    with a stand-in trainer) and the local models in ``models_dir``."""
    ctx = UIContext(
        runs=runs or RunManager(runs_dir or default_runs_dir()),
        models_dir=Path(models_dir).resolve() if models_dir else default_models_dir(),
    )
    with gr.Blocks(title="qmoe") as demo:
        gr.Markdown("# qmoe · mixture-of-LoRA-experts fine-tuning on 4-bit models")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = build_train_tab(ctx)
            with gr.Tab("Monitor", id="monitor", elem_id="tab-monitor") as monitor_tab:
                monitor = build_monitor_tab(ctx)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_tab:
                chat = build_chat_tab(ctx)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare_tab:
                compare = build_compare_tab(ctx)
        build_system_panel(ctx)  # what `qmoe doctor` finds on this machine, below the tabs
        # a run launched in the Train tab becomes the Monitor tab's selection
        train["launched_run"].change(
            lambda name: gr.update(choices=ctx.runs.list_runs(), value=name) if name else gr.skip(),
            train["launched_run"],
            monitor["run"],
            api_visibility="private",
        )
        monitor_tab.select(
            lambda current: gr.update(choices=ctx.runs.list_runs(), value=current),
            monitor["run"],
            monitor["run"],
            api_visibility="private",
        )
        chat_tab.select(chat["refresh_choices"], chat["model"], chat["model"], api_visibility="private")
        compare_tab.select(compare["refresh_choices"], compare["runs"], compare["runs"], api_visibility="private")
    demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY, max_size=MAX_QUEUED_EVENTS)
    demo.qmoe_context = ctx  # tests and `qmoe ui` read the resolved folders from here
    return demo


def launch(
    demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, auth: Accounts | None = None, **kwargs
) -> tuple:
    """Serve ``demo``; returns Gradio's (app, local url, share url). With ``auth`` (non-empty), every route
    needs a login: Gradio's login page and check, plus :class:`LoginRequired` for the routes Gradio leaves
    open."""
    if auth:
        kwargs["auth"] = auth
        kwargs.setdefault(
            "auth_message",
            "qmoe: log in with an account of this UI (its --auth-file or $QMOE_UI_AUTH, or user qmoe with the "
            "password `qmoe ui --auth-token auto` printed when it started)",
        )
        app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(LoginRequired)]
        kwargs["app_kwargs"] = app_kwargs
    return demo.launch(
        server_name=host,
        server_port=port,
        css_paths=[CSS_PATH] if CSS_PATH.is_file() else None,
        footer_links=["api", "gradio"],
        **kwargs,
    )


# `gradio app/main.py` (auto-reload) runs this file and re-executes it on every change, serving `demo`;
# a plain import (qmoe ui, tests) builds nothing
if __name__ == "__main__" or os.environ.get("GRADIO_WATCH_DEMO_PATH"):
    demo = build_app()

if __name__ == "__main__":
    launch(demo)
