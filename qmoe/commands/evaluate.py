"""``qmoe eval RUN_OR_ADAPTER_DIR``: batched greedy evaluation of a tuned model (or its base alone)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_ADAPTER_DIR", help="a run directory or an adapter folder")
    parser.add_argument(
        "--task",
        help="gsm8k | commonsense | jsonl | an LLM-Adapters task name (SVAMP, boolq, ...) "
        "| a test.json path (default: the run's eval task)",
    )
    parser.add_argument("--data", help="test data file or folder (default: the task's test set)")
    parser.add_argument("--limit", type=int, help="evaluate the first N examples")
    parser.add_argument("--base-only", action="store_true", help="evaluate the base model without the adapter")
    parser.add_argument("--base", help="base model source (default: from the run's recipe or the adapter folder)")
    parser.add_argument("--batch-size", type=int, help="prompts generated together")
    parser.add_argument("--max-new-tokens", type=int, help="longest generated answer")
    parser.add_argument(
        "--output",
        help="where to write the results JSON (default: eval.json, or eval-base.json "
        "with --base-only, or eval-<task>.json for another task, in the run/adapter folder)",
    )


def run(args: argparse.Namespace) -> int:
    from ..chat import load_chat_model, resolve_adapter
    from ..evaluation import format_table, run_evaluation
    from ..pipeline import setup_logging
    from ..recipe import load_recipe
    from ..rundir import RECIPE, eval_file_name

    folder = Path(args.path)
    if not folder.is_dir():
        raise UsageError(f"run or adapter folder not found: {folder}")
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    recipe = load_recipe(folder) if (folder / RECIPE).is_file() else None
    defaults = recipe.eval if recipe is not None else None
    task = args.task or (defaults.task or recipe.data.task if recipe is not None else "gsm8k")
    data_path = args.data if args.data else (defaults.path if defaults is not None and not args.task else None)
    limit = args.limit if args.limit is not None else (defaults.limit if defaults is not None else None)
    batch_size = args.batch_size or (defaults.batch_size if defaults is not None else 8)
    max_new_tokens = args.max_new_tokens or (defaults.max_new_tokens if defaults is not None else 256)

    setup_logging(None)
    source, quantization, dtype, adapter_dir = resolve_adapter(folder, args.base)
    chat = load_chat_model(
        None if args.base_only else folder, base_source=source, quantization=quantization, compute_dtype=dtype
    )
    if args.output:
        out_file = Path(args.output)
    else:
        same_task = args.task is None or (recipe is not None and task == (defaults.task or recipe.data.task))
        other = None if same_task else Path(task).parent.name if task.endswith(".json") else task
        out_file = folder / eval_file_name(other, base=args.base_only)
    system_prompt = recipe.data.system_prompt if recipe is not None else None
    label = f"{source} (base)" if args.base_only else f"{source} + {adapter_dir}"
    result = run_evaluation(
        chat.model,
        chat.tokenizer,
        task=task,
        path=data_path,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        system_prompt=system_prompt,
        data_section=recipe.data if recipe is not None else None,
        out_file=out_file,
        extra={"model": source, "adapter": None if args.base_only else str(adapter_dir)},
    )
    print(format_table([{**result, "model": label}]))
    print(f"wrote {out_file}")
    return 0
