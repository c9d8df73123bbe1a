"""``qmoe bench``: time and memory of each adapter method against PEFT LoRA and the per-expert loop."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the small plan (under 5 minutes on a 2-core CPU)")
    parser.add_argument("--json", metavar="FILE", help="also write every comparison as JSON to FILE")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown to FILE")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads; default 1 on CPU: on a shared machine two threads wait on each other and small "
        "ops slow down 10-100x, drowning what is measured (pass 2+ on a dedicated machine)",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-configuration peak-memory child processes"
    )
    parser.add_argument(
        "--generate",
        action="store_true",
        help="instead: generation tokens/s of the base model vs each method's adapter (batch 1 and 16, prefill "
        "and decode separately; qmoe/bench/generate.py)",
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="--generate: tokens generated per run (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="--generate: timed interleaved rounds (default 3)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="--generate: also the base and each method with a compiled decode step (qmoe chat --compile), at "
        "each batch size; compiling takes up to a minute per model and batch size on a CPU",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help="restrict layer and step comparisons to these (moelora loracoe loramoe lora moelora-nocl)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UsageError

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is available (use --device cpu)")
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else None)
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads {threads}: must be >= 1")
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the peak-memory child processes inherit it

    import transformers
    from rich.console import Console

    from ..bench import plan_for, run_bench
    from ..bench.adapters import METHOD_SETTINGS
    from ..bench.report import markdown, print_table, write_json
    from ..cli import command_line

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    err = Console(stderr=True)
    if args.generate:
        return _run_generate(args, device, err)
    plan = plan_for(device, quick=args.quick)
    if args.methods:
        unknown = [m for m in args.methods if m not in METHOD_SETTINGS]
        if unknown:
            raise UsageError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_SETTINGS)}")
        plan.layer_methods = [m for m in args.methods if m != "moelora-nocl"]
        plan.step_methods = list(args.methods)
    plan.memory = not args.no_memory
    result = run_bench(plan, progress=lambda msg: err.print(msg, highlight=False))
    result["meta"]["command"] = command_line(args)
    print_table(result)
    if args.json:
        write_json(result, args.json)
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    return 0


def _run_generate(args: argparse.Namespace, device: str, err) -> int:
    import json

    from ..bench.adapters import METHOD_SETTINGS
    from ..bench.generate import markdown_generation, measure_generation
    from ..cli import command_line
    from ..errors import UsageError
    from ..io import atomic_write_text

    methods = args.methods or ["moelora", "loracoe", "loramoe", "lora"]
    unknown = [m for m in methods if m not in METHOD_SETTINGS]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_SETTINGS)}")
    for name in ("new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    result = measure_generation(
        device=device,
        methods=methods,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        progress=lambda msg: err.print(msg, highlight=False),
        compiled=args.compile,
    )
    result["meta"]["command"] = command_line(args)
    table = markdown_generation(result)
    print(table, end="")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, table)
    return 0
