"""``qmoe ui``: serve the Gradio web UI (train, monitor, chat, compare) on this machine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="port (default 7860, or the next free one; $GRADIO_SERVER_PORT also works)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="folder holding the run directories (default ./runs or $QMOE_RUNS_DIR)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="folder whose model sub-folders the UI may offer as local models "
        "(default $QMOE_UI_MODELS_DIR, else $QMOE_CACHE/models or ~/.cache/qmoe/models)",
    )
    parser.add_argument(
        "--auth-file",
        type=Path,
        default=None,
        help="require a login: FILE holds user:password lines (also $QMOE_UI_AUTH=user:password); "
        "needed for a --host other than loopback",
    )
    parser.add_argument(
        "--auth-token",
        choices=["auto"],
        default=None,
        help="require a login with user 'qmoe' and a random password printed once at start (stored nowhere)",
    )


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError

    try:
        from qmoe_app.main import build_app, launch
    except ModuleNotFoundError as exc:
        if exc.name in ("qmoe_app", "qmoe_app.main"):
            raise UsageError("the web UI package 'qmoe_app' is not installed with this qmoe") from None
        if exc.name == "gradio":
            raise UsageError("the web UI needs gradio: pip install 'qmoe[ui]'") from None
        raise
    if args.runs_dir is not None and args.runs_dir.exists() and not args.runs_dir.is_dir():
        raise UsageError(f"--runs-dir {args.runs_dir} is not a folder")
    from qmoe_app.auth import resolve_accounts

    accounts, login_line = resolve_accounts(args.host, args.auth_file, args.auth_token)  # refuses before any work
    demo = build_app(runs_dir=args.runs_dir, models_dir=args.models_dir)
    ctx = demo.qmoe_context
    print(f"qmoe ui: runs in {ctx.runs.runs_dir}, local models from {ctx.models_dir}", flush=True)
    port = args.port or (int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None)
    if accounts:
        print(f"qmoe ui: login required ({', '.join(sorted(set(accounts.origins.values())))})", flush=True)
    if login_line:
        print(login_line, flush=True)  # the only place the generated password ever appears
    launch(demo, host=args.host, port=port, auth=accounts or None)
    return 0
