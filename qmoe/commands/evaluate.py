"""``qmoe eval RUN_OR_ADAPTER_DIR``: batched greedy evaluation of a tuned model (or its base alone)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from . import add_dequantize_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", metavar="RUN_OR_ADAPTER_DIR", help="a run directory, an adapter folder, or a hub repo id of an adapter"
    )
    parser.add_argument("--revision", help="branch, tag or commit of a hub adapter repo (default: main)")
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
    add_dequantize_argument(parser)
    parser.add_argument(
        "--scorer",
        choices=["exact", "math-verify"],
        help="how math answers are compared: exact (qmoe's number extraction) or math-verify (LaTeX and "
        "symbolic equivalence; pip install 'qmoe[math]'); default: the run's eval.scorer, else exact",
    )
    parser.add_argument(
        "--output",
        help="where to write the results JSON (default: eval.json, or eval-base.json "
        "with --base-only, or eval-<task>.json for another task, in the run/adapter folder)",
    )


def run(args: argparse.Namespace) -> int:
    from ..chat import load_chat_model, resolve_adapter
    from ..evaluation import format_table, run_evaluation
    from ..hub import download_adapter, is_repo_id
    from ..pipeline import setup_logging
    from ..recipe import load_recipe
    from ..rundir import RECIPE, eval_file_name
    from ..serialization import AdapterError

    hub_repo = args.path if is_repo_id(args.path) else None
    if hub_repo is not None:
        try:
            folder = download_adapter(hub_repo, args.revision)
        except AdapterError as exc:
            raise UsageError(str(exc)) from None
    elif args.revision is not None:
        raise UsageError(f"--revision applies to hub repo ids, not to the local folder {args.path}")
    else:
        folder = Path(args.path)
    if not folder.is_dir():
        raise UsageError(f"run or adapter folder not found: {folder}")
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    recipe = load_recipe(folder) if (folder / RECIPE).is_file() else None
    defaults = recipe.eval if recipe is not None else None
    task = args.task or (defaults.task or recipe.data.eval_task if recipe is not None else "gsm8k")
    data_path = args.data if args.data else (defaults.path if defaults is not None and not args.task else None)
    limit = args.limit if args.limit is not None else (defaults.limit if defaults is not None else None)
    batch_size = args.batch_size or (defaults.batch_size if defaults is not None else 8)
    max_new_tokens = args.max_new_tokens or (defaults.max_new_tokens if defaults is not None else 256)

    setup_logging(None)
    source, quantization, dtype, adapter_dir = resolve_adapter(folder, args.base)
    chat = load_chat_model(
        None if args.base_only else folder,
        base_source=source,
        quantization=quantization,
        compute_dtype=dtype,
        dequantize=args.dequantize,
    )
    if args.output:
        out_file = Path(args.output)
    else:
        same_task = args.task is None or (recipe is not None and task == (defaults.task or recipe.data.eval_task))
        other = None if same_task else Path(task).parent.name if task.endswith(".json") else task
        name = eval_file_name(other, base=args.base_only)
        # a hub adapter lives in the read-only hub cache: its results go to the working directory
        out_file = Path(f"{hub_repo.replace('/', '--')}-{name}") if hub_repo else folder / name
    scorer = args.scorer or (defaults.scorer if defaults is not None else "exact")
    system_prompt = recipe.data.system_prompt if recipe is not None else None
    label = f"{source} (base)" if args.base_only else f"{source} + {hub_repo or adapter_dir}"
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
        extra={"model": source, "adapter": None if args.base_only else (hub_repo or str(adapter_dir))},
        scorer=scorer,
    )
    print(format_table([{**result, "model": label}]))
    print(f"wrote {out_file}")
    return 0
