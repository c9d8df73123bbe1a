"""``qmoe compare RECIPE... [--eval-tasks ...]``: train each recipe, evaluate each adapter and the base model
on the same test sets, write RESULTS.md (accuracy per task, trainable parameters, time, peak memory)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import command_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="*", metavar="RECIPE", help="recipe YAML files to train and compare")
    parser.add_argument(
        "--run",
        dest="runs",
        nargs="+",
        action="append",
        default=[],
        metavar="ARG",
        help="LABEL RECIPE [KEY=VALUE ...]: one more run with its own overrides (repeatable), "
        "e.g. --run moelora-no-cl recipes/gsm8k.yaml adapter.contrastive_loss_weight=0",
    )
    parser.add_argument("--labels", nargs="+", help="a name per recipe (default: the file names)")
    parser.add_argument(
        "--pair",
        dest="pairs",
        nargs=2,
        action="append",
        default=[],
        metavar=("RUN", "REFERENCE"),
        help="also compare RUN with REFERENCE problem by problem (repeatable; every run is always "
        "paired with the first), e.g. --pair moelora moelora-no-cl for an ablation",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="overrides applied to every recipe, e.g. train.max_steps=100 data.limit=800",
    )
    parser.add_argument(
        "--eval-tasks",
        nargs="+",
        default=["gsm8k"],
        help="test sets: gsm8k, SVAMP, MultiArith, AddSub, SingleEq, mawps, ... or test.json paths",
    )
    parser.add_argument("--eval-limit", type=int, help="first N examples of each test set")
    parser.add_argument("--eval-batch-size", type=int, help="prompts generated together")
    parser.add_argument("--max-new-tokens", type=int, help="longest generated answer")
    parser.add_argument(
        "--select-by",
        choices=("val_nll",),
        help="choose among runs labelled GROUP@VARIANT (e.g. lora@lr1e-3, lora@lr3e-4) before testing: each "
        "group's run with the lowest answer NLL on a validation split (--val-last) is evaluated, the others are not",
    )
    parser.add_argument(
        "--val-last",
        type=int,
        default=500,
        metavar="N",
        help="--select-by: the validation split is the last N records of the training data (default 500); "
        "data.limit must stop before them",
    )
    parser.add_argument("--out-dir", default="runs/compare", help="where the runs go (default: runs/compare)")
    parser.add_argument("--results", default="RESULTS.md", help="results file (its generated block is replaced)")
    parser.add_argument("--figures", default="docs/figures", help="expert-specialisation figures folder ('' = none)")


def run(args: argparse.Namespace) -> int:
    from ..compare import run_compare
    from ..errors import UsageError

    if args.eval_limit is not None and args.eval_limit < 1:
        raise UsageError("--eval-limit must be >= 1")
    if args.val_last < 1:
        raise UsageError(f"--val-last must be >= 1, got {args.val_last}")
    runs = [
        (label, recipe, [])
        for label, recipe in zip(args.labels or [Path(r).stem for r in args.recipes], args.recipes, strict=False)
    ]
    if args.labels and len(args.labels) != len(args.recipes):
        raise UsageError(f"--labels gives {len(args.labels)} names for {len(args.recipes)} recipes")
    for spec in args.runs:
        if len(spec) < 2:
            raise UsageError(f"--run needs LABEL RECIPE [KEY=VALUE ...], got {' '.join(spec)}")
        runs.append((spec[0], spec[1], spec[2:]))
    if not runs:
        raise UsageError("nothing to compare: give RECIPE files or --run LABEL RECIPE [KEY=VALUE ...]")
    for _, recipe, _ in runs:
        if not Path(recipe).is_file():
            raise UsageError(f"recipe not found: {recipe}")
    eval_args = []
    if args.eval_batch_size:
        eval_args += ["--batch-size", str(args.eval_batch_size)]
    if args.max_new_tokens:
        eval_args += ["--max-new-tokens", str(args.max_new_tokens)]
    command = command_line(args)
    return run_compare(
        runs,
        args.overrides,
        args.eval_tasks,
        args.eval_limit,
        Path(args.out_dir),
        Path(args.results),
        Path(args.figures) if args.figures else None,
        eval_args,
        command,
        pairs=[tuple(pair) for pair in args.pairs],
        select_last=args.val_last if args.select_by else None,
    )
