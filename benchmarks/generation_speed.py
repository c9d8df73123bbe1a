"""Tokens/s of generation: the base model alone vs the same model with each method's adapter freshly attached
(paper-default configuration), greedy, batch 1 (chat) and batch 16 (evaluation), prefill and decode apart.

    python benchmarks/generation_speed.py --device cuda --json gen.json --markdown gen.md
    python benchmarks/generation_speed.py --device cpu --new-tokens 8 --repeats 1     # a quick look on CPU

The same measurement as ``qmoe bench --generate`` (qmoe/bench/generate.py, where the method is described):
all candidates share the one loaded base's frozen weights and are timed interleaved in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from qmoe.bench.adapters import METHOD_SETTINGS
    from qmoe.bench.generate import markdown_generation, measure_generation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="builtin:smollm2-135m-instruct", help="base model (a qmoe model.source)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--methods", nargs="+", default=["moelora", "loracoe", "loramoe", "lora"], choices=list(METHOD_SETTINGS)
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dequantize", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--compile", action="store_true", help="also rows with a compiled decode step (-compiled)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown to FILE")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("generation_speed.py: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure_generation(
        args.source,
        args.device,
        args.methods,
        tuple(args.batch_sizes),
        args.new_tokens,
        args.repeats,
        args.warmup,
        args.dequantize,
        progress=lambda msg: print(msg, file=sys.stderr),
        compiled=args.compile,
    )
    table = markdown_generation(result)
    print(table, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
