"""Self-check of the Triton kernels before ``auto`` uses them.

On the first use of a kernel per (device, dtype, shape class) in a process, :func:`usable` runs it once on a
small random input, forward and backward, against its PyTorch reference (the same comparisons and
:func:`tolerances` as tests/test_kernels.py). It is used only if it runs and matches; otherwise one
:class:`KernelFallbackWarning` names the kernel and the reason, and the PyTorch path runs for that key from
then on. A shape class is what a kernel is compiled for: MoELoRA's (N experts, r, top-k), LoRACoE's (E, r).

Test-only: ``auto`` considers Triton for CUDA tensors alone; with ``QMOE_KERNELS_AUTO_INTERPRET=1`` (and
``TRITON_INTERPRET=1``) it also considers it for CPU tensors, so the self-check and the fused paths run on a
machine without a GPU. Only the tests and ``benchmarks/gpu_validation.sh --dry-run`` set it.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from .loracoe import loracoe_gate, loracoe_gate_reference
from .moelora import moelora_gate, moelora_gate_reference

KERNELS = ("moelora", "loracoe")
# the shape class checked when the caller does not say which one it runs (e.g. a benchmark's label)
DEFAULT_SHAPES = {"moelora": (8, 4, 2), "loracoe": (2, 16)}
# > the largest token block of triton_kernels (128) and a multiple of none: several programs and a masked tail
CHECK_TOKENS = 131
# outputs that are fp32 whatever z's dtype: router probabilities, the dense gate, LoRACoE's rank weights
FP32_OUTPUT_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
AUTO_INTERPRET_ENV = "QMOE_KERNELS_AUTO_INTERPRET"


def tolerances(dtype: torch.dtype) -> dict:
    """assert_close tolerances of a kernel output in ``dtype`` (and of d loss / d z) against the reference."""
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


class KernelFallbackWarning(RuntimeWarning):
    """A fast path cannot be used (a Triton or C++ kernel failed to build or its self-check, or the compiled decode
    step failed to compile); qmoe runs the plain PyTorch path instead."""


def failure_summary(exc: BaseException) -> str:
    """'Type: first line of the message' (300 characters at most) of why a fast path failed, for the one warning
    that says so. A wrapped error (torch's BackendCompilerFailed.inner_exception, or a raise ... from) is
    described by the innermost one: the compiler's own message, not torch's wrapper."""
    while (inner := getattr(exc, "inner_exception", None) or exc.__cause__) is not None:
        exc = inner
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


_verdicts: dict[tuple, str | None] = {}  # key -> None (usable) or why not
_lock = threading.Lock()


def auto_interpret() -> bool:
    """Test-only switch: may ``auto`` pick the interpreted Triton kernels for CPU tensors?"""
    return os.environ.get(AUTO_INTERPRET_ENV, "0") not in ("", "0")


def failure(kernel: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> str | None:
    """Why the Triton ``kernel`` is not to be used for this key, or None when it passed its self-check.

    Checked on the first call per key only; a failure is announced by one :class:`KernelFallbackWarning`."""
    key = (kernel, str(device), dtype, tuple(shape))
    verdict = _verdicts.get(key, ...)
    if verdict is ...:
        with _lock:  # one check per key even when several threads reach it at once
            if key not in _verdicts:
                why = check(kernel, torch.device(device), dtype, tuple(shape))
                _verdicts[key] = why
                if why is not None:
                    warnings.warn(
                        f"{describe(kernel, device, dtype, shape)} failed its self-check: {why}; using the PyTorch "
                        "path for it from now on (QMOE_KERNELS=torch skips the check, QMOE_KERNELS=triton forces "
                        "the kernel)",
                        KernelFallbackWarning,
                        stacklevel=2,
                    )
            verdict = _verdicts[key]
    return verdict


def usable(kernel: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """Whether the Triton ``kernel`` passed its self-check for this key (see :func:`failure`)."""
    return failure(kernel, device, dtype, shape) is None


def forget() -> None:
    """Drop every verdict (tests; the next use checks again)."""
    with _lock:
        _verdicts.clear()


def describe(kernel: str, device, dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    dims = ", ".join(f"{name}={value}" for name, value in zip(SHAPE_NAMES[kernel], shape, strict=True))
    return f"the Triton {kernel} kernel ({dims}, {str(dtype).replace('torch.', '')}, {device})"


def check(kernel: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> str | None:
    """Run the Triton ``kernel`` once against its reference: None when it matches, else one line saying why."""
    if kernel not in CHECKS:
        raise ValueError(f"kernel {kernel!r} is invalid: must be one of {', '.join(KERNELS)}")
    # a check may run inside no_grad/inference_mode (generation), autocast, or a checkpointed forward whose
    # saved-tensor hooks would recompute the whole block on the check's backward: it gets none of them
    try:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(device.type, enabled=False),
            torch.autograd.graph.saved_tensors_hooks(_keep, _keep),
        ):
            mismatch = CHECKS[kernel](device, dtype, *shape)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # asynchronous launch errors surface here, not later in training
    except Exception as exc:  # noqa: BLE001 - any failure to compile or run means "do not use it"
        return f"it failed to compile or run: {failure_summary(exc)}"
    return mismatch


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _differs(name: str, actual: torch.Tensor, expected: torch.Tensor, **tolerance) -> str | None:
    try:
        torch.testing.assert_close(actual, expected, **tolerance)
    except AssertionError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
        return f"{name} differs from the PyTorch reference ({detail[:300]})"
    return None


def moelora_input(t: int, n: int, r: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """z = [router logits | rank activations]; logits well separated so bf16 rounding never ties the top-k."""
    g = torch.Generator().manual_seed(seed)  # a private generator: the check never moves the training RNG
    logits = torch.stack([torch.randperm(n, generator=g) for _ in range(t)]).float() * 0.5
    logits += torch.rand(t, n, generator=g) * 0.1
    h = torch.randn(t, n * r, generator=g)
    return torch.cat([logits, h], 1).to(device=device, dtype=dtype).requires_grad_(True)


def _check_moelora(device, dtype, n: int, r: int, k: int) -> str | None:
    z = moelora_input(CHECK_TOKENS, n, r, dtype, device)
    z_ref = z.detach().clone().requires_grad_(True)
    gated, probs, ids, gate = moelora_gate(z, n, r, k, "triton")
    ref_gated, ref_probs, ref_ids, ref_gate = moelora_gate_reference(z_ref, n, r, k)
    if not torch.equal(ids.cpu(), ref_ids.cpu()):
        return "forward: the chosen top-k experts differ from the PyTorch reference"
    g = torch.Generator().manual_seed(1)
    w_gated = torch.randn(gated.shape, generator=g).to(device)
    w_probs = torch.randn(probs.shape, generator=g).to(device)
    (grad,) = torch.autograd.grad((gated.float() * w_gated).sum() + (probs * w_probs).sum(), z)
    (ref_grad,) = torch.autograd.grad((ref_gated.float() * w_gated).sum() + (ref_probs * w_probs).sum(), z_ref)
    return (
        _differs("forward: gated", gated.float(), ref_gated.float(), **tolerances(dtype))
        or _differs("forward: probs", probs, ref_probs, **FP32_OUTPUT_TOLERANCE)
        or _differs("forward: gate", gate, ref_gate, **FP32_OUTPUT_TOLERANCE)
        or _differs("backward: d loss / d z", grad.float(), ref_grad.float(), **tolerances(dtype))
    )


def _check_loracoe(device, dtype, e: int, r: int) -> str | None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(CHECK_TOKENS, r + e * r, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    factor = float(r)  # composition_factor is r or 1; a runtime argument, not part of the shape class
    gated, weights = loracoe_gate(z, e, r, factor, "triton")
    ref_gated, ref_weights = loracoe_gate_reference(z_ref, e, r, factor)
    w = torch.randn(gated.shape, generator=g).to(device)
    (grad,) = torch.autograd.grad((gated.float() * w).sum(), z)
    (ref_grad,) = torch.autograd.grad((ref_gated.float() * w).sum(), z_ref)
    return (
        _differs("forward: gated", gated.float(), ref_gated.float(), **tolerances(dtype))
        or _differs("forward: weights", weights, ref_weights.detach(), **FP32_OUTPUT_TOLERANCE)
        or _differs("backward: d loss / d z", grad.float(), ref_grad.float(), **tolerances(dtype))
    )


CHECKS = {"moelora": _check_moelora, "loracoe": _check_loracoe}
SHAPE_NAMES = {"moelora": ("N", "r", "k"), "loracoe": ("E", "r")}
