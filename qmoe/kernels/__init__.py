"""Fused router kernels for the MoE adapter layers, and the switch that picks them.

Each layer computes ``z = x @ [router; A]^T`` (MoELoRA) or ``z = x @ [A; W_route]^T`` (LoRACoE) with one
matmul and the output with one ``B`` matmul; what sits between the two matmuls (softmax, top-k, averaging
over experts, gating in rank space) is fused here into one elementwise pass over ``z``, with a custom
``torch.autograd.Function`` whose backward recomputes the routing from ``z`` instead of saving it.

Backends (env ``QMOE_KERNELS`` or :func:`set_backend`, the latter wins):

- ``auto`` (default): ``triton`` for CUDA tensors when triton is importable and the kernel passed its
  self-check on first use (:mod:`qmoe.kernels.selfcheck`), ``torch`` otherwise;
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


def forced_backend() -> str | None:
    """What :func:`set_backend` forced (None: the env var / auto decides)."""
    return _forced


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


_used: dict[str, str] = {}  # kernel -> the backend it last ran with (backends_used)


def backend_for(x: torch.Tensor, kernel: str | None = None, shape: tuple[int, ...] = ()) -> str:
    """The backend that handles tensor ``x`` (the kernel's input z): 'triton', 'function' or 'torch'.

    ``kernel`` ('moelora' | 'loracoe') and ``shape`` (its shape class: (N, r, top_k) | (E, r)) say what runs:
    ``auto`` then self-checks that kernel for x's device and dtype before its first use, and the choice is
    recorded for :func:`backends_used`. Without them ``auto`` checks every kernel at its default shape class.
    """
    name, ran = requested_backend(), None
    if name == "auto":
        on_device = x.is_cuda or (selfcheck.auto_interpret() and triton_interpreting())
        name = "triton" if on_device and triton_available() else "torch"
        if name == "triton":
            checks = [(kernel, shape)] if kernel is not None else list(selfcheck.DEFAULT_SHAPES.items())
            failed = next((why for k, s in checks if (why := selfcheck.failure(k, x.device, x.dtype, s))), None)
            if failed is not None:
                name, ran = "torch", f"torch (the Triton kernel failed its self-check: {failed})"
    elif name == "triton":
        if not triton_available():
            raise RuntimeError("QMOE_KERNELS=triton but triton is not installed (pip install 'qmoe[kernels]')")
        if not x.is_cuda and not triton_interpreting():
            raise RuntimeError(
                "QMOE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)"
            )
    if kernel is not None:
        _used[kernel] = ran or name
    return name


def backends_used() -> dict[str, str]:
    """The backend each kernel (= adapter method: moelora, loracoe) last ran with in this process, as chosen by
    backend_for: 'triton', 'function', 'torch', or 'torch (the Triton kernel failed its self-check: REASON)'
    when ``auto`` fell back. Methods without fused kernels (lora, loramoe) never appear."""
    return dict(_used)


from . import selfcheck  # noqa: E402
from .loracoe import loracoe_gate, loracoe_gate_reference  # noqa: E402
from .moelora import moelora_gate, moelora_gate_reference  # noqa: E402


def moelora_routing(z: torch.Tensor, n: int, r: int, k: int):
    """MoELoRA's routing of ``z = x @ [router; A]^T`` through the backend for z's device (the layer's only
    entry point): :func:`moelora_gate_reference` itself for 'torch', its fused version otherwise.

    Returns (gated rank activations [T, N*r], router probabilities [T, N] fp32 (in the graph for the balance
    loss), top ids [T, k], dense gate [T, N] fp32 (telemetry)).
    """
    backend = backend_for(z, "moelora", (n, r, k))
    if backend == "torch":
        return moelora_gate_reference(z, n, r, k)
    return moelora_gate(z, n, r, k, backend)


def loracoe_routing(z: torch.Tensor, e: int, r: int, factor: float):
    """LoRACoE's composition of ``z = x @ [A; W_route]^T`` through the backend for z's device:
    :func:`loracoe_gate_reference` for 'torch', its fused version otherwise.

    Returns (gated rank activations [T, r] (already times ``factor``), rank weights [T, r] fp32).
    """
    backend = backend_for(z, "loracoe", (e, r))
    if backend == "torch":
        return loracoe_gate_reference(z, e, r, factor)
    return loracoe_gate(z, e, r, factor, backend)


__all__ = [
    "BACKENDS",
    "backend_for",
    "backends_used",
    "forced_backend",
    "loracoe_gate",
    "loracoe_gate_reference",
    "loracoe_routing",
    "moelora_gate",
    "moelora_gate_reference",
    "moelora_routing",
    "requested_backend",
    "set_backend",
    "triton_available",
]
