"""Fused router kernels for the MoE adapter layers, and the switch that picks them.

Each layer computes ``z = x @ [router; A]^T`` (MoELoRA) or ``z = x @ [A; W_route]^T`` (LoRACoE) with one
matmul and the output with one ``B`` matmul; what sits between the two matmuls (softmax, top-k, averaging
over experts, gating in rank space) is fused here into one elementwise pass over ``z``, with a custom
``torch.autograd.Function`` whose backward recomputes the routing from ``z`` instead of saving it.

Backends (env ``QMOE_KERNELS`` or :func:`set_backend`, the latter wins):

- ``auto`` (default): ``triton`` for CUDA tensors when triton is importable, ``torch`` otherwise;
- ``triton``: the Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``function``: the same autograd Function with its forward/backward written in PyTorch ops;
- ``torch``: the layers' own plain-autograd PyTorch code (no Function at all).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "function", "torch")
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for this process (``None`` returns to the env var / auto)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is invalid: must be one of {', '.join(BACKENDS)}")
    _forced = name


def requested_backend() -> str:
    name = _forced or os.environ.get("QMOE_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"QMOE_KERNELS={name!r} is invalid: must be one of {', '.join(BACKENDS)}")
    return name


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(x: torch.Tensor) -> str:
    """The backend that handles tensor ``x``: 'triton', 'function' or 'torch'."""
    name = requested_backend()
    if name == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("QMOE_KERNELS=triton but triton is not installed (pip install 'qmoe[kernels]')")
        if not x.is_cuda and not triton_interpreting():
            raise RuntimeError(
                "QMOE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)"
            )
    return name


from .loracoe import loracoe_gate, loracoe_gate_reference  # noqa: E402
from .moelora import moelora_gate, moelora_gate_reference  # noqa: E402


def moelora_fused(layer, x: torch.Tensor):
    """The MoELoRA layer's routing through a fused backend, or None when the plain PyTorch path applies.

    Returns (gated rank activations [T, N*r], rank activations h [T, N*r] (a view of z, in the graph for the
    contrastive loss), router probabilities [T, N] fp32 (in the graph for the balance loss), top ids [T, k],
    dense gate [T, N] fp32 (telemetry)).
    """
    backend = backend_for(x)
    if backend == "torch":
        return None
    n, r, k = layer.config.num_experts, layer.config.r, layer.config.top_k
    z = torch.nn.functional.linear(x, torch.cat([layer.router, layer.lora_A], 0))
    gated, probs, top_ids, gate = moelora_gate(z, n, r, k, backend)
    return gated, z[:, n:], probs, top_ids, gate


def loracoe_fused(layer, x: torch.Tensor):
    """The LoRACoE layer's composition through a fused backend, or None for the plain PyTorch path.

    Returns (gated rank activations [T, r] (already times ``composition_factor``), rank weights [T, r] fp32
    (telemetry, off the graph)).
    """
    backend = backend_for(x)
    if backend == "torch":
        return None
    e, r = layer.config.num_experts, layer.config.r
    z = torch.nn.functional.linear(x, torch.cat([layer.lora_A, layer.router], 0))
    return loracoe_gate(z, e, r, layer.composition_factor, backend)


__all__ = [
    "BACKENDS",
    "backend_for",
    "loracoe_fused",
    "loracoe_gate",
    "loracoe_gate_reference",
    "moelora_fused",
    "moelora_gate",
    "moelora_gate_reference",
    "requested_backend",
    "set_backend",
    "triton_available",
]
