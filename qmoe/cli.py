"""The ``qmoe`` command: a thin dispatcher. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int`` and is imported only when used (fast ``--help``)."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from qmoe.errors import UsageError  # absolute: the same class when this file runs as __main__

# name -> (module, one-line help)
COMMANDS = {
    "finetune": ("qmoe.commands.finetune", "fine-tune a 4-bit model with an adapter recipe"),
    "plan": ("qmoe.commands.plan", "will a recipe fit my GPU? peak memory from the model's config, no weights"),
    "data": ("qmoe.commands.data", "show what a recipe trains on: counts, lengths, truncation, masked examples"),
    "eval": ("qmoe.commands.evaluate", "evaluate a run or adapter folder (or the base model)"),
    "chat": ("qmoe.commands.chat", "chat with a tuned model in the terminal, optionally showing routing"),
    "merge": ("qmoe.commands.merge", "fold a lora adapter into its base model: a plain transformers folder"),
    "push": ("qmoe.commands.push", "upload an adapter (with its model card) to the Hugging Face Hub"),
    "bench": ("qmoe.commands.bench", "benchmark adapter layers and training steps against PEFT LoRA"),
    "compare": ("qmoe.commands.compare", "train and evaluate several recipes, write RESULTS.md"),
    "ui": ("qmoe.commands.ui", "start the Gradio web UI"),
    "doctor": ("qmoe.commands.doctor", "check this machine: GPU, 4-bit, kernels, versions, model, data, disk"),
}


def qmoe_command(*args: str) -> list[str]:
    """argv that runs ``qmoe ARGS`` in a subprocess with this interpreter (the one way qmoe launches itself)."""
    return [sys.executable, "-m", "qmoe", *args]


def command_line(args: argparse.Namespace) -> str:
    """The ``qmoe ...`` command that produced ``args``, as typed (:func:`main` records it), for result files:
    taken from the argv itself, so it never drifts from the options a command has."""
    return shlex.join(["qmoe", *getattr(args, "argv", [args.command])])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmoe", description="Mixture-of-LoRA-experts fine-tuning on 4-bit LLMs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    if getattr(args, "_missing", False):
        print(f"qmoe {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UsageError as exc:
        print(f"qmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qmoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
