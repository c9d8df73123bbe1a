"""``qmoe finetune PATH [key=value ...]``: train a recipe (a YAML file, or a run directory holding recipe.yaml)."""

from __future__ import annotations

import argparse
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
    return run_finetune(recipe, run_dir, resume=args.resume, overwrite=args.overwrite, run_eval=not args.no_eval)
