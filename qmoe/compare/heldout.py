"""Held-out answer loss: teacher-forced NLL of the reference answers of test problems.

Accuracy of a 135M model on grade-school math sits near zero whatever the adapter, so it cannot rank the
methods; the per-token loss on the reference solutions moves long before accuracy does. Tokenised exactly
as in training (chat template, loss on the answer tokens and EOS only), so the number is the training
objective measured on problems the adapter never saw. Differences between runs: ``statistics.paired_nll_difference``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from ..attach import clear_aux, evaluating
from ..data import DataError, PadCollator, tokenize_example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def answer_nll(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    max_length: int = 512,
    batch_size: int = 8,
) -> dict:
    """``{"nll": token-weighted mean, "tokens": N, "per_example": [[nll sum, tokens], ...]}`` over ``records``
    (``{"prompt", "target"}``, and ``"system"`` where training had a system prompt), in their order: every record
    is scored, so two runs' results pair problem by problem."""
    examples = [tokenize_example(tokenizer, r, max_length, r.get("system")) for r in records]
    unscorable = [i for i, e in enumerate(examples) if e is None]
    if unscorable:
        raise DataError(
            f"answer NLL: {len(unscorable)} of {len(records)} prompts (e.g. number {unscorable[0] + 1}) leave no "
            f"answer token within max_length={max_length}; raise it"
        )
    collate = PadCollator(tokenizer.pad_token_id)  # load_base_model gives every tokenizer a pad token
    device = next(model.parameters()).device
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    # batches of similar lengths (little padding: the same numbers, less work); results in the records' order
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    per_example: list = [None] * len(examples)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows]).items()}
            labels = batch["labels"][:, 1:]
            # logits only from the first position that predicts an answer token on: the output layer over
            # the whole vocabulary costs as much as a quarter of a small model, and prompts need none of it
            scored = labels != -100
            first = int(scored.float().argmax(1)[scored.any(1)].min()) if bool(scored.any()) else 0
            kwargs = {"logits_to_keep": labels.shape[1] + 1 - first} if keeps_logits else {}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
            logits = logits.logits.float()
            clear_aux(model)
            if keeps_logits:
                labels = labels[:, first:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            mask = labels != -100
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums = -(picked * mask).sum(1)
            for i, s, n in zip(rows, sums, mask.sum(1), strict=True):
                per_example[i] = [float(s), int(n)]
    tokens = sum(n for _, n in per_example)
    return {"nll": sum(s for s, _ in per_example) / tokens, "tokens": tokens, "per_example": per_example}
