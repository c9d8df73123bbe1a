"""``qmoe finetune PATH [key=value ...]``: train a recipe (a YAML file, or a run directory holding recipe.yaml)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from ..errors import UsageError


def add_arguments(parser: argparse.ArgumentParser, overrides_nargs: str = argparse.REMAINDER) -> None:
    parser.add_argument("path", metavar="PATH", help="recipe YAML, or a run directory containing recipe.yaml")
    # REMAINDER keeps options given after the overrides; run() re-parses them (argparse cannot intermix
    # positionals and options under subcommands)
    parser.add_argument(
        "overrides",
        nargs=overrides_nargs,
        metavar="KEY=VALUE",
        help="recipe overrides, e.g. adapter.top_k=1 train.max_steps=50 (values parsed as YAML)",
    )
    parser.add_argument(
        "--output-dir", help="run directory (default: the recipe's output_dir, or PATH if it is a run directory)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in the output directory from its last checkpoint"
    )
    parser.add_argument("--overwrite", action="store_true", help="delete the output directory's previous results first")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    parser.add_argument(
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel training on N processes (N GPUs; on CPU, N processes over gloo), started by "
        "accelerate's launcher: the same as accelerate launch --multi_gpu --num_processes N -m qmoe finetune ...",
    )


def _with_trailing_options(args: argparse.Namespace) -> argparse.Namespace:
    """Options written after the overrides (``qmoe finetune r.yaml a=1 --no-eval``), parsed properly: the
    captured tail is parsed again on top of the options already parsed (argparse keeps attributes the
    namespace has), so nothing is rebuilt by hand."""
    if not any(item.startswith("-") for item in args.overrides):
        return args
    parser = argparse.ArgumentParser(prog="qmoe finetune")
    add_arguments(parser, overrides_nargs="*")
    return parser.parse_intermixed_args([args.path, *args.overrides], namespace=argparse.Namespace(**vars(args)))


def run(args: argparse.Namespace) -> int:
    from ..pipeline import run_finetune
    from ..recipe import load_recipe
    from ..rundir import RECIPE

    args = _with_trailing_options(args)

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    source = Path(args.path)
    if not source.exists():
        raise UsageError(f"recipe file or run directory not found: {source}")
    if args.output_dir:
        run_dir = Path(args.output_dir)
    elif source.is_dir():
        run_dir = source
    else:
        run_dir = None
    # resuming a recipe file: the run directory's resolved recipe is authoritative (plus new overrides)
    if args.resume and run_dir is None:
        run_dir = Path(load_recipe(source, args.overrides).output_dir)
    if args.resume and (run_dir / RECIPE).is_file():
        recipe = load_recipe(run_dir, args.overrides)
    else:
        recipe = load_recipe(source, args.overrides)
    if run_dir is None:
        run_dir = Path(recipe.output_dir)
    if args.num_processes is not None:
        if args.num_processes < 1:
            raise UsageError(f"--num-processes={args.num_processes} is invalid: must be >= 1")
        if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
            return hand_over_to_accelerate(args, recipe.model.device)
    return run_finetune(recipe, run_dir, resume=args.resume, overwrite=args.overwrite, run_eval=not args.no_eval)


def launcher_command(argv: list[str], processes: int, port: int, cpu: bool) -> list[str]:
    """accelerate's launcher running ``qmoe ARGV`` (``--num-processes`` removed) on ``processes`` processes.
    ``--multi_gpu`` selects its torchrun path on CPU too (there accelerate starts gloo); ``--cpu`` would
    select the single-process (MPI) launcher instead."""
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--num-processes":
            skip = True
        elif not item.startswith("--num-processes="):
            rest.append(item)
    options = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    options += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    if cpu:  # the CPUs shared out between the processes (accelerate's default would be 1 thread each)
        options += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // processes))]
    return [sys.executable, "-m", "accelerate.commands.launch", *options, "-m", "qmoe", *rest]


def _free_port() -> int:
    # a port of our own: two runs on one machine would otherwise both take torchrun's default 29500
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hand_over_to_accelerate(args: argparse.Namespace, device: str) -> int:
    """Replace this process by accelerate's launcher (so a signal to this pid reaches the launcher, which
    forwards it to its workers); returns the launcher's exit status where exec is not available."""
    import torch

    from ..models import pick_device

    device = pick_device(device)
    if device == "cuda" and args.num_processes > torch.cuda.device_count():
        raise UsageError(
            f"--num-processes={args.num_processes} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "use at most one process per GPU"
        )
    command = launcher_command(getattr(args, "argv", []), args.num_processes, _free_port(), device == "cpu")
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execv(command[0], command)
    import subprocess

    return subprocess.call(command)
