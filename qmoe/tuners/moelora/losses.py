"""MoELoRA's auxiliary losses (paper §3.3), as pure functions so they can be tested on their own.

The contrastive loss compares expert outputs ``B_e a`` (``a = A_e x``, rank r) by cosine similarity. Every
inner product it needs is one in rank space, ``<B_e a, B_f b> = ã^T (B^T B) b̃`` with ã, b̃ the rank vectors
placed in their expert's block of the stacked [N*r] rank space and ``B^T B`` one [N*r, N*r] Gram matrix per
layer per step. So the layer computes the loss from rank vectors and the Gram matrix
(:func:`rank_space_contrastive_loss`) and never materialises an [*, out_features] tensor;
:func:`expert_contrastive_loss` is the same loss written on output vectors, kept as its reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# F.normalize's floor on a norm: the output-space reference and the rank-space form divide alike
_NORM_FLOOR = 1e-12


def load_balancing_loss(
    probs: torch.Tensor,
    top_ids: torch.Tensor,
    num_experts: int,
    global_totals: torch.Tensor | None = None,
    processes: int = 1,
) -> torch.Tensor:
    """N * sum_i f_i * P_i (paper §3.3.1, after Shazeer et al. / Switch Transformer).

    probs [T, N]: router softmax; top_ids [T, k]: chosen experts. f_i is the fraction of routed
    (token, slot) assignments that went to expert i (not differentiable), P_i the mean router probability.
    Scaled by N so that uniform routing gives its minimum, 1.0; collapsed routing on one expert gives N.

    Data parallel (``processes`` W > 1): ``global_totals`` [N + 1] is :func:`balance_counts` summed over the
    processes (expert counts, then tokens T). f_i is then the global batch's fraction (all-reduced), and P_i
    this process's tokens' share of the global mean, P_i = (W / T) * sum_{local t} p_ti, so that the mean
    over processes, which DDP's gradient average differentiates, is exactly the loss of the global batch.
    """
    if global_totals is None:
        if probs.shape[0] == 0:
            return probs.sum() * 0.0
        counts = torch.bincount(top_ids.reshape(-1), minlength=num_experts).to(probs.dtype)
        f = counts / counts.sum()
        p = probs.mean(0)
        return num_experts * torch.dot(f, p)
    counts, tokens = global_totals[:-1].to(probs.dtype), global_totals[-1]
    if int(tokens) == 0:
        return probs.sum() * 0.0
    f = counts / counts.sum()
    p = probs.sum(0) * (processes / tokens.to(probs.dtype))
    return num_experts * torch.dot(f, p)


def balance_counts(top_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N + 1] int64: this process's routed (token, slot) count per expert, then its token count: what
    :func:`load_balancing_loss` needs summed over processes."""
    counts = torch.bincount(top_ids.reshape(-1), minlength=num_experts)
    return torch.cat([counts, counts.new_tensor([top_ids.shape[0]])])


def supervised_info_nce(
    cosine: torch.Tensor,
    anchor_labels: torch.Tensor,
    key_labels: torch.Tensor,
    temperature: float,
    self_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Supervised InfoNCE from anchor-key cosine similarities [A, K] (paper §3.3.2).

    Keys of the anchor's own expert are positives, of other experts negatives: loss = mean over anchors with
    >= 1 positive of -log( sum_pos exp(s/tau) / sum_all exp(s/tau) ). ``self_columns`` [A]: the key column
    holding each anchor's own (detached) copy, excluded from both sums. Zero when no anchor has a positive.
    """
    logits = cosine / temperature
    positive = anchor_labels[:, None] == key_labels[None, :]
    if self_columns is not None:
        is_self = torch.zeros_like(positive)
        is_self[torch.arange(cosine.shape[0], device=cosine.device), self_columns] = True
        logits = logits.masked_fill(is_self, float("-inf"))
        positive = positive & ~is_self
    has_pos = positive.any(1)
    if not bool(has_pos.any()):
        return cosine.sum() * 0.0
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (log_all - log_pos)[has_pos].mean()


def expert_contrastive_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    temperature: float,
    self_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """The contrastive loss on output vectors: anchors [A, d] (with gradient) of experts ``anchor_labels``
    [A], keys [K, d] (detached) of experts ``key_labels`` [K]; cosine similarity. The reference of the
    rank-space form the layer uses."""
    if anchors.shape[0] == 0 or keys.shape[0] == 0:
        return anchors.sum() * 0.0
    a = F.normalize(anchors.float(), dim=-1, eps=_NORM_FLOOR)
    k = F.normalize(keys.float(), dim=-1, eps=_NORM_FLOOR)
    return supervised_info_nce(a @ k.t(), anchor_labels, key_labels, temperature, self_columns)


def stack_ranks(ranks: torch.Tensor, labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rank vectors [M, r] of experts ``labels`` [M] placed in their expert's block of [M, N*r] (zeros
    elsewhere), so that ``F.linear(stacked, lora_B)`` is each one's expert output ``B_e a``."""
    r = ranks.shape[1]
    columns = labels[:, None] * r + torch.arange(r, device=ranks.device)
    return ranks.new_zeros(ranks.shape[0], num_experts * r).scatter(1, columns, ranks)


def gram(lora_b: torch.Tensor) -> torch.Tensor:
    """The layer's [N*r, N*r] Gram matrix ``B^T B`` in fp32, off the autograd graph (one per layer per step)."""
    b = lora_b.detach().float()
    return b.t() @ b


def rank_space_sq_norms(stacked: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``||B ã||^2 = ã^T (B^T B) ã`` per row of ``stacked`` [M, N*r] (fp32)."""
    return ((stacked.float() @ gram) * stacked.float()).sum(-1)


# The rank-space loss shifts every logit by the largest possible one, 1/tau (cosines are <= 1), instead of by a
# row maximum: exp((cos - 1) / tau) >= exp(-2 / tau) stays a normal fp32 number (> 1.2e-38) while tau >=
# config.MIN_TEMPERATURE (AdapterConfig enforces it), so no sum underflows and no [anchors, keys] maximum or
# mask pass is needed.


class _RankSpaceInfoNCE(torch.autograd.Function):
    """The contrastive loss from stacked rank vectors in few passes over the [A, K] similarities.

    With u_i = ã_i G / (tau ||B ã_i||) and k'_j = k̃_j / ||B k̃_j||, logit_ij = u_i . k'_j, and
    E = exp(logit - 1/tau). Each key k'_j is zero outside its expert's block of the N*r ranks, so
    (E k')_i restricted to the block of anchor i's expert sums E_ij k'_j over exactly its positives, and
    E @ onehot(key experts) gives every anchor's sum per expert: the InfoNCE sums and their gradients need no
    positive mask. Backward recomputes E (never kept between forward and backward) and returns
    dL/dã and dL/dB of the output-space loss on ``B ã`` with detached keys ``B k̃``.
    """

    @staticmethod
    def forward(ctx, anchors, keys, lora_b, gram, anchor_labels, key_labels, num_experts, temperature, self_columns):
        a, k = anchors.float(), keys.float()
        v = a @ gram  # G a_i: B^T B ã, the anchor side of every inner product
        anchor_norm = (v * a).sum(-1).clamp_min(_NORM_FLOOR**2).sqrt()
        key_norm = ((k @ gram) * k).sum(-1).clamp_min(_NORM_FLOOR**2).sqrt()
        u = v / (anchor_norm * temperature)[:, None]
        k_unit = k / key_norm[:, None]
        exp_logits = _exp_logits(u, k_unit, temperature, self_columns)
        per_expert = exp_logits.new_zeros(a.shape[0], num_experts).index_add_(1, key_labels, exp_logits)  # [A, N]
        own = per_expert.gather(1, anchor_labels[:, None]).squeeze(1)
        total = per_expert.sum(1)
        positives = torch.bincount(key_labels, minlength=num_experts)[anchor_labels] - int(self_columns.numel() > 0)
        has_pos = positives > 0
        ctx.save_for_backward(a, k_unit, lora_b, gram, v, u, anchor_norm, own, total, has_pos, anchor_labels)
        ctx.temperature, ctx.anchor_dtype, ctx.self_columns = temperature, anchors.dtype, self_columns
        ctx.num_experts = num_experts
        count = has_pos.sum()
        terms = (total.log() - own.log()).masked_fill(~has_pos, 0.0)
        return terms.sum() / count.clamp_min(1)

    @staticmethod
    def backward(ctx, grad_loss):
        a, k_unit, lora_b, gram, v, u, anchor_norm, own, total, has_pos, anchor_labels = ctx.saved_tensors
        temperature, num_experts = ctx.temperature, ctx.num_experts
        count = has_pos.sum().clamp_min(1)
        exp_logits = _exp_logits(u, k_unit, temperature, ctx.self_columns)
        weighted = exp_logits @ k_unit  # [A, N*r]: sum_j E_ij k'_j, block f = the keys of expert f
        rank_expert = torch.arange(a.shape[1], device=a.device) // (a.shape[1] // num_experts)
        block = anchor_labels[:, None] == rank_expert[None, :]  # anchor i's own expert's ranks
        inv_total = torch.where(has_pos, 1.0 / total, 0.0)[:, None]
        inv_own = torch.where(has_pos, 1.0 / own, 0.0)[:, None]
        # dL/du_i = sum_j (softmax over all - softmax over positives)_ij k'_j
        grad_u = (inv_total - inv_own * block) * weighted * (grad_loss / count)
        # u = v / (tau n), n = sqrt(a . v), v = a G with G's anchor-side factor B
        grad_v = grad_u / (anchor_norm * temperature)[:, None]
        scale = -(grad_u * u).sum(-1) / anchor_norm.square()  # dL/dn_i / n_i
        grad_a = grad_v @ gram + scale[:, None] * v
        inner = grad_v.t() @ a + a.t() @ (scale[:, None] * a)
        grad_b = (lora_b.float() @ inner).to(lora_b.dtype)
        return grad_a.to(ctx.anchor_dtype), None, grad_b, None, None, None, None, None, None


def _exp_logits(u, k_unit, temperature, self_columns):
    """exp(logit - 1/tau) [A, K], zero in each anchor's own-copy column (neither positive nor negative; zeroed
    before any sum, since that copy's term, exp(0) = 1, would swamp the others in a subtraction)."""
    exp_logits = torch.addmm(u.new_full((1, 1), -1.0 / temperature), u, k_unit.t()).exp_()
    if self_columns.numel():
        exp_logits[torch.arange(u.shape[0], device=u.device), self_columns] = 0.0
    return exp_logits


def rank_space_contrastive_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    lora_b: torch.Tensor,
    num_experts: int,
    temperature: float,
    self_columns: torch.Tensor | None = None,
    layer_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`expert_contrastive_loss` of the outputs ``B ã`` computed in rank space.

    anchors [A, N*r] and keys [K, N*r] are stacked rank vectors of N experts (:func:`stack_ranks`; keys
    detached), lora_b the layer's B [out, N*r], ``layer_gram`` its :func:`gram` when already computed;
    ``temperature`` >= ``config.MIN_TEMPERATURE``. Equal, value and
    gradients (w.r.t. the anchors and B), to the reference on ``F.linear(anchors, B)`` and
    ``F.linear(keys, B.detach())``; memory and compute scale with N*r, not out_features (one [out, N*r] x
    [N*r, N*r] matmul in backward).
    """
    if anchors.shape[0] == 0 or keys.shape[0] == 0:
        return anchors.sum() * 0.0
    layer_gram = gram(lora_b) if layer_gram is None else layer_gram
    if self_columns is None:  # (an empty tensor: autograd Functions take tensors, not None, to save)
        self_columns = torch.empty(0, dtype=torch.long, device=anchors.device)
    return _RankSpaceInfoNCE.apply(
        anchors, keys.detach(), lora_b, layer_gram, anchor_labels, key_labels, num_experts, temperature, self_columns
    )
