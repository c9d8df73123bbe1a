"""MoELoRA as the paper describes it: route each token to its top-k experts, run each expert on its tokens
in a Python loop and sum the weighted outputs. Slow; used to test the batched layer and as the benchmarks'
per-expert-loop baseline."""

import torch

from .losses import expert_contrastive_loss


def moelora_reference(layer, x: torch.Tensor) -> torch.Tensor:
    c = layer.config
    n, r, k = c.num_experts, c.r, c.top_k
    probs = torch.softmax((x @ layer.router.t()).float(), dim=-1)
    top_w, top_ids = probs.topk(k, dim=-1)
    top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    for e in range(n):
        a_e = layer.lora_A[e * r : (e + 1) * r]
        b_e = layer.lora_B[:, e * r : (e + 1) * r]
        for slot in range(k):
            rows = (top_ids[:, slot] == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                y = (x[rows] @ a_e.t()) @ b_e.t()
                out = out.index_add(0, rows, top_w[rows, slot : slot + 1] * y)
    return out * layer.scale


def moelora_contrastive_reference(layer, z: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The layer's contrastive loss computed on output vectors, expert by expert (the form before 0.2):
    a drop-in for ``MoELoraLayer._contrastive`` (same anchors, queue handling and enqueueing) whose keys are
    each queued rank vector through its expert's current B, detached. Tests check the rank-space layer
    against it; it materialises [anchors + keys, out_features] tensors, which the layer never does."""
    from ..base import in_recomputation
    from .layer import _MIN_NORM

    c = layer.config
    r = c.r
    h = z[:, c.num_experts :] if rows is None else z[rows, c.num_experts :]  # non-padding rank activations
    if c.contrastive_loss_weight == 0 or h.shape[0] == 0:
        return h.sum() * 0.0
    count = min(c.contrastive_samples, h.shape[0])
    pick = torch.linspace(0, h.shape[0] - 1, count, device=h.device).round().long()
    pairs = [(t, int(e)) for t in pick.tolist() for e in ids[t]]  # (token, chosen expert), slot order
    ranks = torch.stack([h[t, e * r : (e + 1) * r] for t, e in pairs])
    labels = torch.tensor([e for _, e in pairs], device=h.device)

    def outputs_of(rank_vectors, experts, b):
        return torch.stack([b[:, e * r : (e + 1) * r] @ a for a, e in zip(rank_vectors, experts.tolist(), strict=True)])

    outputs = outputs_of(ranks, labels, layer.lora_B)
    keep = outputs.detach().norm(dim=-1) > _MIN_NORM
    outputs, labels, ranks = outputs[keep], labels[keep], ranks[keep]
    queue, queue_labels = layer.queue_for_this_forward()
    keys, key_labels, offset = outputs.detach(), labels, 0
    if queue is not None and queue.shape[0]:
        queued = outputs_of(queue.to(ranks.dtype), queue_labels, layer.lora_B.detach())
        keys, key_labels, offset = torch.cat([queued, keys]), torch.cat([queue_labels, labels]), queue.shape[0]
    self_columns = torch.arange(outputs.shape[0], device=h.device) + offset
    loss = expert_contrastive_loss(outputs, labels, keys, key_labels, c.contrastive_temperature, self_columns)
    if not in_recomputation():
        layer._enqueue(ranks.detach(), labels)
    return loss
