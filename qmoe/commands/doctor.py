"""``qmoe doctor``: check this machine for qmoe (Python, torch, CUDA and GPU, bitsandbytes 4-bit, Triton kernels,
library versions, builtin model, offline data, free disk); exit status 1 when the main job cannot run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print the checks as JSON (name, ok, detail, fix, required)"
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="where runs go, for the free-disk check (default ./runs or $QMOE_RUNS_DIR)",
    )
    parser.add_argument("--gpu", action="store_true", help="count a missing CUDA GPU as broken (exit status 1)")


def run(args: argparse.Namespace) -> int:
    from qmoe_app.paths import default_runs_dir

    from ..doctor import as_json, format_report, healthy, run_checks

    checks = run_checks(args.runs_dir or default_runs_dir(), gpu_required=args.gpu)
    print(json.dumps(as_json(checks), indent=2) if args.json else format_report(checks), flush=True)
    return 0 if healthy(checks) else 1
