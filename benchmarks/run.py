"""Run a qmoe bench plan and keep its results under benchmarks/results/ (JSON + Markdown tables).

    python benchmarks/run.py --quick            # what BENCHMARKS.md's CPU tables come from
    python benchmarks/run.py --device cuda      # the GPU rows (full plan)

Same code as ``qmoe bench`` (qmoe.bench); this script only chooses where the files go.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from qmoe.cli import main as qmoe_main

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    stem = RESULTS / f"{device}-{'quick' if args.quick else 'full'}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    argv = ["bench", "--device", device, "--json", f"{stem}.json", "--markdown", f"{stem}.md"]
    if args.quick:
        argv.append("--quick")
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return qmoe_main(argv)


if __name__ == "__main__":
    sys.exit(main())
