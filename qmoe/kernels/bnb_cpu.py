"""bitsandbytes' fused 4-bit CPU kernel, called straight from qmoe's inference kernels; and the one place qmoe reads
bitsandbytes' private names (the inventory in ``qmoe/hf_private.py`` lists them, ``tests/test_hf_private.py``
notices when they move).

Why: on CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weights at its first eval forward and from
then on multiplies them with a fused bf16 kernel of its C library. At decode (one token) the Python in front of that
kernel (``Linear4bit.forward``, ``matmul_4bit``, ``gemv_4bit``, the registered op, ``ctypes``) takes about as long
as the kernel itself: ~35 µs per call on the benchmark CPU, over 200 calls per generated token (BENCHMARKS.md).
A :class:`Frozen4bit` (``cpu_decode.cpp``) does what that Python does (round x to bf16, call the same C function
on the same packed bytes, widen its bf16 output to x's dtype) in one call, and an adapter layer's ``Decoder`` runs
it before adding the adapter: the frozen layer and its adapter in one C++ call per projection. Bit-identical to
``Linear4bit.forward`` (self-checked before first use; where it is not, one :class:`KernelFallbackWarning` and
bitsandbytes' own forward runs).

Private names of bitsandbytes read here (0.50; checked by ``tests/test_hf_private.py``):

``bitsandbytes.cextension.lib.gemv_4bit_inference_cpu_nf4_bf16`` and ``..._fp4_bf16``
    the C functions bitsandbytes' registered ``gemv_4bit`` CPU op calls through ctypes, with arguments
    (M, N, K, bf16 x, packed uint8 weight, bf16 absmax, bf16 out, blocksize, x row stride, out row stride). If
    their signature changed, the self-check fails (warning, bitsandbytes' forward runs); if renamed, nothing is
    found and bitsandbytes' forward runs.
``QuantState.packing_format_for_cpu`` (and the bf16 ``absmax`` of shape [in / blocksize, out] it implies)
    set when bitsandbytes has repacked a layer for that kernel; only such layers are called directly.
``bitsandbytes.backends.cpu.ops.gemm_4bit_forward_kernel``
    the Hugging Face hub kernel bitsandbytes prefers over its C functions when the ``kernels`` package could
    load it; while it is set, bitsandbytes does not call the C functions, so neither does qmoe (``qmoe doctor``
    reports which kernel is in use).
``bitsandbytes.functional._convert_weight_packed_for_cpu_inverse``
    undoes the repacking: :func:`standard_layout`, for dequantised copies (``qmoe.inference``).
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from types import ModuleType

import torch
from torch import nn

from .selfcheck import KernelFallbackWarning, failure_summary

# bitsandbytes' C functions by quant type
GEMV_SYMBOLS = {"nf4": "gemv_4bit_inference_cpu_nf4_bf16", "fp4": "gemv_4bit_inference_cpu_fp4_bf16"}
# the compute dtypes for which Linear4bit.forward feeds the kernel x rounded straight to bf16 (fp16 would round twice)
_DIRECT_COMPUTE_DTYPES = (torch.float32, torch.bfloat16)
# QMOE_DIRECT_4BIT=0 or set_direct_calls(False): bitsandbytes' own forward always (to rule the direct call out, and
# the benchmarks' comparison rows)
DIRECT_ENV = "QMOE_DIRECT_4BIT"
_enabled = os.environ.get(DIRECT_ENV, "1").strip().lower() not in ("0", "false", "no")
_lock = threading.Lock()
_verdict: dict[str, str | None] = {}  # "why": None when the direct call passed its self-check, else why not


def linear4bit_class() -> type | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def hub_kernel_state() -> str:
    """Which 4-bit CPU kernel bitsandbytes uses: 'hub' (kernels-community's, via the ``kernels`` package),
    'builtin' (its C library's bf16 kernel) or 'none' (no AVX512-BF16: it dequantises per forward)."""
    try:
        import bitsandbytes  # noqa: F401 - registers its CPU backend
        from bitsandbytes.backends.cpu import ops
    except ImportError:
        return "none"
    if not hasattr(ops, "gemm_4bit_forward_kernel"):
        return "none"
    return "hub" if ops.gemm_4bit_forward_kernel is not None else "builtin"


def kernel_address(quant_type: str) -> int | None:
    """The address of bitsandbytes' C function for ``quant_type``, or None where its library lacks it."""
    symbol = GEMV_SYMBOLS.get(quant_type)
    if symbol is None:
        return None
    try:
        from bitsandbytes.cextension import lib

        function = getattr(lib, symbol)
        return ctypes.cast(function, ctypes.c_void_p).value or None
    except (ImportError, AttributeError, RuntimeError, TypeError, ctypes.ArgumentError):
        return None


def standard_layout(data: torch.Tensor, state) -> tuple[torch.Tensor, object]:
    """A 4-bit weight and its quant state in bitsandbytes' standard layout (what ``dequantize_4bit`` reads),
    undoing the CPU repacking where bitsandbytes did it (as its own state_dict does)."""
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(data, state)
    return data, state


def set_direct_calls(enabled: bool) -> None:
    """Whether adapter layers built from now on call bitsandbytes' CPU kernel directly (default) or its forward."""
    global _enabled
    _enabled = bool(enabled)


def direct_calls_enabled() -> bool:
    return _enabled


def direct_calls_apply(device: str) -> bool:
    """Whether qmoe calls bitsandbytes' CPU kernel directly for 4-bit layers on ``device``: CPU, bitsandbytes' built-in
    bf16 kernel in use, the calls not turned off (``QMOE_DIRECT_4BIT=0``, ``QMOE_KERNELS`` other than auto). (Each
    layer still needs qmoe's kernels and the self-check: :func:`frozen_kernel`.)"""
    from . import requested_backend

    return _enabled and device == "cpu" and requested_backend() == "auto" and hub_kernel_state() == "builtin"


def direct_spec(module: ModuleType, layer: nn.Module) -> tuple[int, int] | None:
    """(kernel address, blocksize) of the direct call for ``layer`` (a bitsandbytes Linear4bit), or None where it
    does not apply: not a 4-bit layer, training, a bias, not (yet) repacked for the CPU kernel (bitsandbytes does it
    at the first eval forward), a compute dtype other than float32/bf16, the hub kernel in use, the calls turned
    off, or the self-check failed."""
    cls = linear4bit_class()
    if not _enabled or cls is None or not isinstance(layer, cls) or layer.training or layer.bias is not None:
        return None
    weight = layer.weight
    state = weight.quant_state
    if weight.device.type != "cpu" or not getattr(state, "packing_format_for_cpu", False):
        return None
    if layer.compute_dtype not in _DIRECT_COMPUTE_DTYPES or hub_kernel_state() != "builtin":
        return None
    address = kernel_address(state.quant_type)
    if address is None or not usable(module):
        return None
    return address, state.blocksize


def frozen_kernel(module: ModuleType, layer: nn.Module):
    """``module.Frozen4bit`` computing ``layer`` as its forward does, or None where :func:`direct_spec` is None."""
    spec = direct_spec(module, layer)
    if spec is None:
        return None
    # the Parameter itself, not .data: bitsandbytes replaces its data when it (un)packs, which the kernel notices
    weight = layer.weight
    return module.Frozen4bit(spec[0], weight, weight.quant_state.absmax, layer.out_features, layer.in_features, spec[1])


def _qmoe_kernels() -> ModuleType | None:
    """qmoe's CPU inference kernels, which make the direct call (``QMOE_KERNELS=auto`` only), or None."""
    from . import requested_backend
    from .cpu_decode import kernels

    return kernels() if requested_backend() == "auto" else None


def kernel_for(layer: nn.Module):
    """:func:`frozen_kernel` of ``layer`` with qmoe's kernels, or None where they or the direct call do not serve it
    (a frozen 4-bit layer outside any adapter: ``qmoe.inference.Direct4bit``)."""
    module = _qmoe_kernels()
    return None if module is None else frozen_kernel(module, layer)


def compiled_spec(layer: nn.Module) -> tuple[int, int] | None:
    """:func:`direct_spec` of ``layer`` for a graph about to be compiled, having bitsandbytes repack it for its CPU
    kernel first (a graph must not do that itself), or None where the direct call does not apply."""
    if not hasattr(layer, "weight") or not direct_calls_apply(layer.weight.device.type):
        return None
    pack_for_cpu_kernel(layer)
    module = _qmoe_kernels()
    return None if module is None else direct_spec(module, layer)


def frozen_output(x: torch.Tensor, layer: nn.Module, spec: tuple[int, int] | None) -> torch.Tensor:
    """``layer``'s output for ``x`` in a graph ``torch.compile`` traces: the direct call as the operator
    ``qmoe::gemv_4bit_cpu`` (registered by qmoe's kernels) where ``spec`` (:func:`direct_spec`, taken beforehand) is
    given and the weights are still packed, else the layer's forward. The compiler guards on the packing flag, so
    weights bitsandbytes unpacked since recompile the graph onto the forward, which packs them again."""
    weight = layer.weight
    if spec is not None and getattr(weight.quant_state, "packing_format_for_cpu", False):
        absmax = weight.quant_state.absmax
        return torch.ops.qmoe.gemv_4bit_cpu(x, weight, absmax, spec[0], layer.out_features, spec[1])
    return layer(x)


def pack_for_cpu_kernel(layer: nn.Module) -> None:
    """Have bitsandbytes repack an eval-mode ``layer`` for its CPU kernel now (its first eval forward does it),
    so that :func:`direct_spec` can be taken before a graph is compiled."""
    cls = linear4bit_class()
    if cls is None or not isinstance(layer, cls) or layer.training or layer.weight.device.type != "cpu":
        return
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False) and hub_kernel_state() != "none":
        with torch.no_grad():
            layer(torch.zeros(1, layer.in_features, dtype=layer.compute_dtype or torch.float32))


def usable(module: ModuleType) -> bool:
    """Whether the direct call passed its self-check in this process (run once, on first use)."""
    if "why" not in _verdict:
        with _lock:
            if "why" not in _verdict:
                try:
                    why = check(module)
                except Exception as exc:  # noqa: BLE001 - a direct call that raises is not used either
                    why = f"its self-check raised {failure_summary(exc)}"
                if why is not None:
                    warnings.warn(
                        f"qmoe does not call bitsandbytes' 4-bit CPU kernel directly ({why}); bitsandbytes' "
                        "Linear4bit.forward runs instead (same results, more Python per call)",
                        KernelFallbackWarning,
                        stacklevel=3,
                    )
                _verdict["why"] = why
    return _verdict["why"] is None


def status() -> str:
    """One line for ``qmoe doctor``."""
    if not _enabled:
        return f"off ({DIRECT_ENV}=0)"
    if hub_kernel_state() != "builtin":
        return "not used (bitsandbytes does not run its built-in bf16 CPU kernel here)"
    if "why" not in _verdict:
        return "not checked yet (on the first CPU inference forward with an adapter)"
    return "in use" if _verdict["why"] is None else f"not used: {_verdict['why']}"


def forget() -> None:
    """Drop the self-check's verdict (tests)."""
    with _lock:
        _verdict.clear()


# the check's layer: a few output blocks of the kernel's packing (32 rows) and input blocks (64 columns)
_CHECK_SHAPE = (96, 192)  # (out, in)
_CHECK_TOKENS = (1, 3, 37)  # decode, the stack path's range, many (the tensor path)


def check(module: ModuleType) -> str | None:
    """Each quant type's direct call against ``Linear4bit.forward`` on a small random layer: None when the outputs
    are bit-identical for float32 and bf16 inputs of 1, 3 and 37 tokens, else what differs."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(0)  # the check never moves the caller's RNG
    out_features, in_features = _CHECK_SHAPE
    for quant_type in GEMV_SYMBOLS:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type=quant_type, device="cpu"
        )
        dense = torch.randn(out_features, in_features, generator=g)
        layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type=quant_type).to("cpu")
        layer.eval()
        with torch.no_grad():
            layer(torch.zeros(1, in_features))  # bitsandbytes repacks for its CPU kernel here
            state = layer.weight.quant_state
            address = kernel_address(quant_type)
            if not getattr(state, "packing_format_for_cpu", False) or address is None:
                return f"bitsandbytes did not repack a {quant_type} layer for its CPU kernel, or its library lacks it"
            frozen = module.Frozen4bit(address, layer.weight, state.absmax, out_features, in_features, state.blocksize)
            for dtype in (torch.float32, torch.bfloat16):
                for tokens in _CHECK_TOKENS:
                    x = torch.randn(1, tokens, in_features, generator=g).to(dtype)
                    got, expected = frozen.run(x), layer(x)
                    if got is None:
                        return "the kernel says the weights changed when they did not"
                    if got.dtype != expected.dtype or not torch.equal(got, expected):
                        diff = (got.float() - expected.float()).abs().max().item()
                        return f"{quant_type}, {dtype}, {tokens} tokens: differs from Linear4bit.forward by {diff:.3g}"
    return None
