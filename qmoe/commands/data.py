"""``qmoe data RECIPE [key=value ...] [--show N]``: what a recipe would train on, before spending GPU hours.

Prints how many examples there are, tokens per example (min/median/max), how many were truncated inside an
answer or dropped and why, then the first N examples as the model sees them with the trained-on tokens
marked (green in a terminal, ``[[...]]`` otherwise). Exit status 2 when the set would refuse to train.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE", help="a recipe YAML file or a run directory")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. data.limit=100")
    parser.add_argument("--show", type=int, default=3, metavar="N", help="examples to print (default: 3; 0 = none)")


def run(args: argparse.Namespace) -> int:
    from ..dataprep import data_preview, render_segments, require_trainable
    from ..errors import UsageError
    from ..recipe import load_recipe

    if args.show < 0:
        raise UsageError(f"--show must be >= 0 (got {args.show})")
    recipe = load_recipe(args.recipe, args.overrides)
    preview = data_preview(recipe, show=args.show)
    tty = sys.stdout.isatty()
    if tty:
        from rich.console import Console

        console = Console(highlight=False, soft_wrap=True)  # no inserted line breaks: the text is the data
        emit = console.print
    else:
        emit = print
    for line in preview.report.lines():
        emit(line if not tty else line.replace("[", "\\["))
    legend = "trained-on tokens in bold green" if tty else "trained-on tokens between [[ and ]]"
    for i, segments in enumerate(preview.examples):
        emit(f"\n--- example {i + 1} ({legend}) ---")
        emit(render_segments(segments, "rich" if tty else "plain"))
    require_trainable(preview.report)
    return 0
