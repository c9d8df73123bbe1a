"""``qmoe plan RECIPE [key=value ...] [--vram GB ...] [--json]``: will this recipe fit my GPU?

Exit status: 0, or with a single ``--vram`` the verdict (0 fits, 1 does not); 2 for bad input."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RECIPE", help="recipe YAML, or a run directory containing recipe.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.batch_size=8 model.device=cuda"
    )
    parser.add_argument(
        "--vram",
        nargs="+",
        type=float,
        metavar="GB",
        help="GPU memory sizes to judge, in GB of 2^30 bytes as GPUs are sold (default: 8 12 16 24); with one "
        "size the exit status is the verdict: 0 fits, 1 does not",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from ..plan import DEFAULT_VRAM, plan_recipe, render
    from ..recipe import load_recipe

    vram = tuple(args.vram) if args.vram else DEFAULT_VRAM
    for size in vram:
        if not 0 < size <= 4096:
            raise UsageError(f"--vram {size:g}: a GPU memory size in GB, > 0 and at most 4096")
    recipe = load_recipe(args.path, args.overrides)
    plan = plan_recipe(recipe, vram)
    if args.json:
        json.dump(plan.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(render(plan))
    if args.vram and len(args.vram) == 1:
        return 0 if plan.verdicts[0].fits else 1
    return 0
