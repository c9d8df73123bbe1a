"""MoELoRA's auxiliary losses (paper §3.3), as pure functions so they can be tested on their own."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balancing_loss(probs: torch.Tensor, top_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """N * sum_i f_i * P_i (paper §3.3.1, after Shazeer et al. / Switch Transformer).

    probs [T, N]: router softmax; top_ids [T, k]: chosen experts. f_i is the fraction of routed
    (token, slot) assignments that went to expert i (not differentiable), P_i the mean router probability.
    Scaled by N so that uniform routing gives its minimum, 1.0; collapsed routing on one expert gives N.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    counts = torch.bincount(top_ids.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts / counts.sum()
    p = probs.mean(0)
    return num_experts * torch.dot(f, p)


def expert_contrastive_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    temperature: float,
    self_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Supervised InfoNCE between expert outputs (paper §3.3.2).

    anchors [A, d] are outputs of experts ``anchor_labels`` [A] (with gradient); keys [K, d] are recent
    (detached) outputs with their expert ids. Outputs of the same expert are positives, of other experts
    negatives: loss = mean over anchors with >= 1 positive of
    -log( sum_pos exp(s/tau) / sum_all exp(s/tau) ), s the cosine similarity.
    ``self_columns`` [A]: the key column holding each anchor's own (detached) copy, excluded from both sums.
    Zero when no anchor has a positive key (e.g. the very first step with a single expert active).
    """
    if anchors.shape[0] == 0 or keys.shape[0] == 0:
        return anchors.sum() * 0.0
    a = F.normalize(anchors.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    logits = a @ k.t() / temperature  # [A, K]
    positive = anchor_labels[:, None] == key_labels[None, :]
    if self_columns is not None:
        is_self = torch.zeros_like(positive)
        is_self[torch.arange(anchors.shape[0], device=anchors.device), self_columns] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        positive = positive & ~is_self
    has_pos = positive.any(1)
    if not bool(has_pos.any()):
        return anchors.sum() * 0.0
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (log_all - log_pos)[has_pos].mean()
