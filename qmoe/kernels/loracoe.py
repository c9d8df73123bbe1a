"""LoRACoE's fused composition (paper App. C): from z = x @ [A; W_route]^T (one matmul) to the gated ranks.

    h, logits = z[:, :r], z[:, r:] viewed as [T, E, r]
    weights   = mean over the E experts of softmax over the r ranks          (one weight per rank)
    gated     = h * weights * factor                                       (factor = r or 1, see the layer)

The layer then applies B. The Function saves only z and recomputes the softmaxes in backward.
"""

from __future__ import annotations

import torch


def loracoe_gate_reference(z: torch.Tensor, e: int, r: int, factor: float):
    """Plain PyTorch (autograd) definition: (gated [T, r] in z's dtype, weights [T, r] fp32)."""
    h, logits = z[:, :r], z[:, r:].reshape(-1, e, r)
    weights = torch.softmax(logits.float(), dim=-1).mean(1)
    gated = (h.float() * weights * factor).to(z.dtype)
    return gated, weights


def _backward_torch(z, grad_gated, e, r, factor):
    h, logits = z[:, :r].float(), z[:, r:].float().reshape(-1, e, r)
    probs = torch.softmax(logits, dim=-1)
    weights = probs.mean(1)
    grad_gated = grad_gated.float() * factor
    grad_h = grad_gated * weights
    grad_w = (grad_gated * h)[:, None, :]  # the mean over experts spreads it to each expert's softmax / E
    grad_logits = probs * (grad_w - (probs * grad_w).sum(-1, keepdim=True)) / e
    return torch.cat([grad_h, grad_logits.reshape(-1, e * r)], dim=1).to(z.dtype)


class LoraCoEGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, e, r, factor, backend):
        if backend == "triton":
            from .triton_kernels import loracoe_forward

            gated, weights = loracoe_forward(z, e, r, factor)
        else:
            gated, weights = loracoe_gate_reference(z, e, r, factor)
        ctx.save_for_backward(z)
        ctx.shape = (e, r, factor, backend)
        ctx.mark_non_differentiable(weights)
        return gated, weights

    @staticmethod
    def backward(ctx, grad_gated, _grad_weights):
        (z,) = ctx.saved_tensors
        e, r, factor, backend = ctx.shape
        if grad_gated is None:
            return None, None, None, None, None
        if backend == "triton":
            from .triton_kernels import loracoe_backward

            grad_z = loracoe_backward(z, grad_gated, e, r, factor)
        else:
            grad_z = _backward_torch(z, grad_gated, e, r, factor)
        return grad_z, None, None, None, None


def loracoe_gate(z: torch.Tensor, e: int, r: int, factor: float, backend: str = "function"):
    """Fused version of :func:`loracoe_gate_reference`; the weights output is off the autograd graph."""
    if backend not in ("triton", "function"):
        raise ValueError(f"backend {backend!r} is invalid: must be 'triton' or 'function'")
    return LoraCoEGate.apply(z.contiguous(), e, r, float(factor), backend)
