"""MoELoRA's fused routing: from z = x @ [router; A_1..A_N]^T (one matmul) to the gated rank activations.

    logits, h = z[:, :N], z[:, N:]                       (h: N experts x r ranks)
    probs     = softmax(logits)                          (fp32; the balance loss needs it)
    gate      = probs on the top-k experts, renormalised to sum 1, zero elsewhere
    gated     = h * gate expanded over each expert's r ranks

The layer then applies B to ``gated``. The Function saves only z (T x N(r+1) numbers) and recomputes the
routing in backward, where the plain autograd version keeps probs, the top-k values, the expanded gate and
several temporaries alive until backward.
"""

from __future__ import annotations

import torch


def moelora_gate_reference(z: torch.Tensor, n: int, r: int, k: int):
    """Plain PyTorch (autograd) definition the fused backends are tested against.

    Returns (gated [T, N*r] in z's dtype, probs [T, N] fp32, top ids [T, k], gate [T, N] fp32).
    """
    logits, h = z[:, :n], z[:, n:]
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_ids = probs.topk(k, dim=-1)
    gate = torch.zeros_like(probs).scatter(1, top_ids, top_w / top_w.sum(-1, keepdim=True))
    gated = (h.float().view(-1, n, r) * gate[:, :, None]).reshape(-1, n * r).to(z.dtype)
    return gated, probs, top_ids, gate


def _backward_torch(z, grad_gated, grad_probs, n, r, k):
    """d loss / d z from the output gradients, recomputing the routing from z (PyTorch ops)."""
    logits, h = z[:, :n].float(), z[:, n:].float().view(-1, n, r)
    probs = torch.softmax(logits, dim=-1)
    top_w, top_ids = probs.topk(k, dim=-1)
    gate = torch.zeros_like(probs).scatter(1, top_ids, top_w / top_w.sum(-1, keepdim=True))
    grad_gated = grad_gated.float().view(-1, n, r)
    grad_h = grad_gated * gate[:, :, None]
    # the renormalised top-k weights are a softmax over the chosen logits: softmax's Jacobian on that subset
    grad_gate = (grad_gated * h).sum(-1)
    grad_logits = gate * (grad_gate - (gate * grad_gate).sum(-1, keepdim=True))
    if grad_probs is not None:
        grad_probs = grad_probs.float()
        grad_logits = grad_logits + probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
    return torch.cat([grad_logits, grad_h.reshape(-1, n * r)], dim=1).to(z.dtype)


class MoELoraGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, n, r, k, backend):
        if backend == "triton":
            from .triton_kernels import moelora_forward

            gated, probs, top_ids, gate = moelora_forward(z, n, r, k)
        else:
            gated, probs, top_ids, gate = moelora_gate_reference(z, n, r, k)
        ctx.save_for_backward(z)
        ctx.shape = (n, r, k, backend)
        ctx.mark_non_differentiable(top_ids, gate)
        return gated, probs, top_ids, gate

    @staticmethod
    def backward(ctx, grad_gated, grad_probs, _grad_ids, _grad_gate):
        (z,) = ctx.saved_tensors
        n, r, k, backend = ctx.shape
        if grad_gated is None:
            grad_gated = torch.zeros(z.shape[0], n * r, dtype=z.dtype, device=z.device)
        if backend == "triton":
            from .triton_kernels import moelora_backward

            grad_z = moelora_backward(z, grad_gated, grad_probs, n, r, k)
        else:
            grad_z = _backward_torch(z, grad_gated, grad_probs, n, r, k)
        return grad_z, None, None, None, None


def moelora_gate(z: torch.Tensor, n: int, r: int, k: int, backend: str = "function"):
    """Fused version of :func:`moelora_gate_reference` (same outputs); ``backend`` 'triton' or 'function'."""
    if backend not in ("triton", "function"):
        raise ValueError(f"backend {backend!r} is invalid: must be 'triton' or 'function'")
    return MoELoraGate.apply(z.contiguous(), n, r, k, backend)
