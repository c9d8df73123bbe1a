"""Measurements for a mixture of tasks: multiple-choice accuracy by answer likelihood, and routing by task.

A 135M model rarely writes "the correct answer is answer2" verbatim after a few hundred steps, so generated
answers measure the format more than the knowledge. Scoring the choices instead (lm-eval-harness's
multiple-choice method) asks which of the allowed answers the model finds likeliest after the prompt and the
shared answer words, tokenised exactly as in training. Routing by task asks the question a mixture exists
for: do the experts a token is sent to depend on the task it comes from?
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from ..attach import clear_aux, evaluating
from ..data import DataError, PadCollator, tokenize_example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..chat import ChatModel

_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$", re.MULTILINE)


def answer_choices(prompt: str) -> list[str]:
    """The allowed answers of an LLM-Adapters multiple-choice prompt ("Answer format: answer1/answer2/...")."""
    found = _ANSWER_FORMAT.search(prompt)
    if not found or "/" not in found.group(1):
        raise DataError(f"no 'Answer format: a/b/...' line in the prompt: {prompt[-120:]!r}")
    return found.group(1).split("/")


def _candidates(tokenizer: PreTrainedTokenizerBase, record: dict, max_length: int) -> tuple[list[int], list[list[int]]]:
    """(shared prefix ids, each choice's own ids): every choice tokenised as a training example with target
    "the correct answer is <choice>"; the tokens all choices share at the start and at the end (the answer words,
    end-of-turn markup) are cut off, so a choice is scored on the tokens that tell it apart."""
    sequences = []
    for choice in answer_choices(record["prompt"]):
        candidate = {"prompt": record["prompt"], "target": f"the correct answer is {choice}"}
        example = tokenize_example(tokenizer, candidate, max_length)
        if example is None:
            raise DataError(f"prompt longer than max_length={max_length}: {record['prompt'][:80]!r}")
        sequences.append(example["input_ids"])
    start = 0
    while all(len(s) > start for s in sequences) and len({s[start] for s in sequences}) == 1:
        start += 1
    end = 0  # shared suffix length, never into the shared prefix
    while all(len(s) - end - 1 > start for s in sequences) and len({s[-end - 1] for s in sequences}) == 1:
        end += 1
    return sequences[0][:start], [s[start : len(s) - end] for s in sequences]


def _next_token_logprobs(model: torch.nn.Module, prefixes: list[list[int]], pad_id: int) -> torch.Tensor:
    """[batch, vocab] log-probabilities of the token after each prefix (one forward, right-padded)."""
    device = next(model.parameters()).device
    batch = PadCollator(pad_id)([{"input_ids": p, "labels": p} for p in prefixes])
    lengths = torch.tensor([len(p) for p in prefixes])
    # only the positions that are some row's last one need the output layer (rows have similar lengths)
    keep = int(lengths.max() - lengths.min()) + 1
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), logits_to_keep=keep
    ).logits.float()
    clear_aux(model)
    rows = torch.arange(len(prefixes))
    return torch.log_softmax(logits[rows, (lengths - 1) - (lengths.max() - keep)], dim=-1).cpu()


def choice_logprobs_reference(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, record: dict, max_length: int
) -> list[float]:
    """Each choice's summed log-probability of its own tokens, one full forward per choice (the plain
    definition; :func:`choice_accuracy` computes the same with one forward per problem when it can)."""
    prefix, own = _candidates(tokenizer, record, max_length)
    scores = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for tokens in own:
            ids = torch.tensor([prefix + tokens], device=device)
            logp = torch.log_softmax(model(input_ids=ids).logits.float()[0], dim=-1)
            clear_aux(model)
            positions = range(len(prefix) - 1, len(prefix) + len(tokens) - 1)
            scores.append(float(sum(logp[p, t] for p, t in zip(positions, tokens, strict=True))))
    return scores


def choice_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    max_length: int = 512,
    batch_size: int = 16,
) -> dict:
    """``{"accuracy", "correct", "n", "per_example": [1 | 0, ...]}``: a problem is right when its gold answer has
    the highest log-probability among its choices (ties go to the first choice). Where every choice differs from
    the others by a single token (answer1..answer5, true/false with this tokenizer) one forward over the shared
    prefix scores them all; otherwise each choice is scored with its own forward."""
    prepared = [(_candidates(tokenizer, r, max_length), answer_choices(r["prompt"]).index(r["gold"])) for r in records]
    per_example: list[int] = [0] * len(records)
    single = [i for i, ((_, own), _) in enumerate(prepared) if all(len(t) == 1 for t in own)]
    with evaluating(model):
        single.sort(key=lambda i: len(prepared[i][0][0]))
        for start in range(0, len(single), batch_size):
            rows = single[start : start + batch_size]
            logp = _next_token_logprobs(model, [prepared[i][0][0] for i in rows], tokenizer.pad_token_id)
            for row, i in enumerate(rows):
                (_, own), gold = prepared[i]
                scores = logp[row, [t[0] for t in own]]
                per_example[i] = int(int(scores.argmax()) == gold)
        for i in sorted(set(range(len(records))) - set(single)):
            scores = choice_logprobs_reference(model, tokenizer, records[i], max_length)
            per_example[i] = int(max(range(len(scores)), key=scores.__getitem__) == prepared[i][1])
    correct = sum(per_example)
    return {"accuracy": correct / len(records), "correct": correct, "n": len(records), "per_example": per_example}


def task_routing(chat: ChatModel, texts_by_task: dict[str, list[str]], module: str | None = None) -> dict[str, list]:
    """``{task: [layers][experts]}``: the share of the task's tokens whose top-1 expert is e, per transformer
    layer (teacher-forced prompt + answer texts, routing traces of ``module``; for LoRACoE the experts are
    ranks). Empty for an adapter without routing (LoRA)."""
    from .specialisation import MODULE, routing_by_token, top1_shares

    shares = {}
    for task, texts in texts_by_task.items():
        tokens, weights = routing_by_token(chat, texts, module or MODULE)
        if not weights:
            return {}
        shares[task] = top1_shares(weights, torch.ones(len(tokens), dtype=torch.bool)).tolist()
    return shares


def task_specialisation(shares: dict[str, list]) -> dict:
    """How far each task's routing is from the all-task routing, as total-variation distance per layer (0 = the
    task's tokens go where every task's go; 1 - 1/tasks when each task has experts of its own). The all-task load
    weighs the tasks equally (their token counts differ). ``task_vs_all_tv``: per task, averaged over layers;
    ``by_layer``: per layer, averaged over tasks; ``mean``: over both."""
    by_task = {task: torch.tensor(s) for task, s in shares.items()}
    overall = torch.stack(list(by_task.values())).mean(0)
    per_layer = {task: 0.5 * (s - overall).abs().sum(1) for task, s in by_task.items()}  # task -> [layers]
    tv = {task: float(d.mean()) for task, d in per_layer.items()}
    by_layer = torch.stack(list(per_layer.values())).mean(0)
    return {"task_vs_all_tv": tv, "by_layer": by_layer.tolist(), "mean": float(by_layer.mean())}
