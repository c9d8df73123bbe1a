"""Batched greedy generation and scoring; writes ``eval.json`` (task, n, accuracy, per-example predictions)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .answers import score
from .data import apply_prompt_template, chat_prompt, load_test_records, resolve_eval_task
from .io import atomic_write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .recipe import DataSection

log = logging.getLogger("qmoe")


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    system_prompt: str | None = None,
) -> list[str]:
    """Greedy completions of user ``prompts`` (chat template applied), left-padded as one batch."""
    texts = [chat_prompt(tokenizer, p, system_prompt) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class EvaluationStopped(Exception):
    """``should_stop`` returned True between two batches."""


def evaluate_records(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    kind: str,
    *,
    task: str,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    system_prompt: str | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    scorer: str = "exact",
) -> dict:
    """Generate for every record and score it (``scorer``: exact | math-verify, see ``qmoe.answers.score``);
    the eval.json payload. ``should_stop()`` is checked between batches (a stop request during the final
    evaluation of a run)."""
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = True
    predictions = []
    try:
        bar = tqdm(total=len(records), desc=f"eval {task}", unit="ex", disable=not progress)
        for start in range(0, len(records), batch_size):
            if should_stop is not None and should_stop():
                raise EvaluationStopped
            chunk = records[start : start + batch_size]
            outputs = generate(model, tokenizer, [r["prompt"] for r in chunk], max_new_tokens, system_prompt)
            for offset, (record, text) in enumerate(zip(chunk, outputs, strict=False)):
                prediction, correct = score(kind, text, record["gold"], scorer)
                predictions.append(
                    {
                        "index": start + offset,
                        "prompt": record["prompt"],
                        "gold": record["gold"],
                        "generated": text,
                        "prediction": prediction,
                        "correct": bool(correct),
                    }
                )
            bar.update(len(chunk))
        bar.close()
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    correct = sum(p["correct"] for p in predictions)
    return {
        "task": task,
        "kind": kind,
        "scorer": scorer,
        "n": len(predictions),
        "correct": correct,
        "accuracy": correct / len(predictions) if predictions else 0.0,
        "predictions": predictions,
    }


def run_evaluation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: str,
    path: str | None,
    limit: int | None,
    batch_size: int,
    max_new_tokens: int,
    system_prompt: str | None = None,
    data_section: DataSection | None = None,
    out_file: Path | None = None,
    extra: dict | None = None,
    should_stop: Callable[[], bool] | None = None,
    scorer: str = "exact",
) -> dict:
    """Load the test set of ``task``, evaluate, and write ``out_file`` atomically when given."""
    kind, name = resolve_eval_task(task)
    records = load_test_records(task, path, limit, data_section)
    if data_section is not None:  # evaluate with the prompt format the adapter was trained on
        records = apply_prompt_template(records, data_section.prompt_template)
    log.info("evaluating on %d %s examples", len(records), name)
    result = evaluate_records(
        model,
        tokenizer,
        records,
        kind,
        task=name,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        system_prompt=system_prompt,
        should_stop=should_stop,
        scorer=scorer,
    )
    if extra:
        result = {
            **{k: v for k, v in result.items() if k != "predictions"},
            **extra,
            "predictions": result["predictions"],
        }
    if out_file is not None:
        atomic_write_json(out_file, result)
    log.info("accuracy on %s: %.4f (%d/%d)", name, result["accuracy"], result["correct"], result["n"])
    return result


def format_table(rows: list[dict]) -> str:
    """A small fixed-width table of evaluation results."""
    header = ("model", "task", "n", "correct", "accuracy")
    lines = [[str(r.get(h, "")) if h != "accuracy" else f"{r['accuracy']:.4f}" for h in header] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines]
    )
