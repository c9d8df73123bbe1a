"""qmoe's CPU inference kernels (``cpu_decode.cpp``): each adapted layer's eval-mode adapter step in one call.

Why: at decode time a CPU spends an adapter layer's time on per-op overhead and memory traffic, not arithmetic
(BENCHMARKS.md, "Generation with adapters attached"): ~15 eager ops per MoELoRA layer, each several times
slower right after bitsandbytes' 4-bit kernel. A ``Decoder`` (one per layer, holding its fused weights) does
the same up-matmul, routing and in-place down-matmul as the eager fast path (its reference,
:class:`qmoe.tuners.base.EagerDecoder`) in one call; for a few tokens without BLAS, and for MoELoRA reading
only the chosen experts' weights.

How it is had: compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``; about
30 s once, then loaded from torch's extension cache, ``$TORCH_EXTENSIONS_DIR``), and self-checked against the
eager path on random inputs before it is used. Where it cannot be built or fails its check, one
:class:`~qmoe.kernels.selfcheck.KernelFallbackWarning` says why and the eager path runs. Used for float32
CPU tensors when ``QMOE_KERNELS`` is ``auto`` (the default); ``QMOE_KERNELS=torch`` turns it off.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from .selfcheck import KernelFallbackWarning, failure_summary

if TYPE_CHECKING:  # (qmoe.tuners imports this package)
    from ..tuners.base import AdapterLayer

log = logging.getLogger("qmoe")

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
_NAME = "qmoe_cpu_decode"
# tokens per call up to which a method's Decoder runs its loops instead of BLAS (measured: BENCHMARKS.md)
LOOP_TOKENS = {"lora": 16, "moelora": 16, "loramoe": 16, "loracoe": 4}
# the C++ Method enum's numbers
METHOD_IDS = {"lora": 0, "moelora": 1, "loramoe": 2, "loracoe": 3}
_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": the checked module or None; "why": why not


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    # the source's hash is part of torch's cache key: an edited kernel is rebuilt, an unchanged one loaded
    log.info("loading qmoe's CPU inference kernels (built on first use: about 30 s, then cached)")
    # -fopenmp-simd: the loops' `omp simd` reductions vectorise (no OpenMP runtime, no threads)
    return load(name=_NAME, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp-simd"], verbose=False)


def kernels() -> ModuleType | None:
    """The compiled, self-checked module, or None (after one warning) where it cannot be had."""
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                module, why = None, None
                try:
                    module = _build()
                except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: run eager
                    why = f"it could not be built: {failure_summary(exc)}"
                if module is not None:
                    try:
                        why = check(module)
                    except Exception as exc:  # noqa: BLE001 - a kernel that raises is not used either
                        why = f"its self-check raised {failure_summary(exc)}"
                if why is None:
                    _register_fake()
                if why is not None:
                    module = None
                    warnings.warn(
                        f"qmoe's CPU inference kernels are not used ({why}); adapter layers run their eager "
                        "PyTorch path (QMOE_KERNELS=torch skips them)",
                        KernelFallbackWarning,
                        stacklevel=2,
                    )
                _state.update(module=module, why=why)
    return _state["module"]  # type: ignore[return-value]


def _register_fake() -> None:
    """The shape function of the operator ``qmoe::gemv_4bit_cpu`` (defined in cpu_decode.cpp), for tracing."""
    if _state.get("fake_registered"):
        return

    @torch.library.register_fake("qmoe::gemv_4bit_cpu")
    def _(x, weight, absmax, address, out_features, blocksize):
        return x.new_empty((*x.shape[:-1], out_features))

    _state["fake_registered"] = True


def decoder_for(
    module: ModuleType,
    layer: AdapterLayer,
    up: torch.Tensor,
    up_t: torch.Tensor,
    down_t: torch.Tensor,
    params: list[torch.Tensor],
    loop_tokens: int | None = None,
):
    """``module``'s Decoder for ``layer``'s fused weights (up [R', in], its transpose, down_t [R, out]) and the
    parameters they were built from; ``loop_tokens`` defaults to the method's :data:`LOOP_TOKENS`."""
    method, n, r, k = layer.decoder_spec()
    # the loops read up's rows and then down_t's: one allocation, one stream for the prefetcher (measured: a few %
    # of decode speed for LoRA; BENCHMARKS.md)
    packed = torch.cat([up.reshape(-1), down_t.reshape(-1)])
    rows, cols = packed[: up.numel()].view(up.shape), packed[up.numel() :].view(down_t.shape)
    loops = LOOP_TOKENS[method] if loop_tokens is None else loop_tokens
    return module.Decoder(METHOD_IDS[method], rows, up_t, cols, params, n, r, k, loops)


def status() -> str:
    """One line for ``qmoe doctor``: whether the kernels are in use in this process, or why not."""
    if "module" not in _state:
        return "not loaded yet (built and checked on the first CPU inference forward)"
    return "in use" if _state["module"] is not None else f"not used: {_state['why']}"


def forget() -> None:
    """Drop the loaded module's verdict (tests; the next use loads and checks again)."""
    with _lock:
        registered = _state.get("fake_registered")
        _state.clear()
        if registered:  # (once per process: the operator stays defined)
            _state["fake_registered"] = True


# what the check runs: each method's layer at a small shape class, with routing that is actually exercised
_CHECK_CONFIGS = {
    "lora": dict(method="lora", r=8),
    "moelora": dict(method="moelora", r=4, num_experts=8, top_k=2),
    "loramoe": dict(method="loramoe", r=16, num_experts=4),
    "loracoe": dict(method="loracoe", r=16, num_experts=2, stage="joint"),
}
# token counts: one (decode), a few (the loops' upper end in the check), many (BLAS); the last row of each is all
# zeros (a padding token: every router logit ties)
_CHECK_TOKENS = (1, 3, 37)


def check(module: ModuleType) -> str | None:
    """Run every method's Decoder on random weights and inputs against the layer's eager decoder: None when
    outputs and routing telemetry all match."""
    from ..config import AdapterConfig
    from ..tuners import layer_class
    from ..tuners.base import AdapterContext, EagerDecoder

    g = torch.Generator().manual_seed(0)  # a private generator: the check never moves the caller's RNG
    with torch.no_grad():
        for method, settings in _CHECK_CONFIGS.items():
            layer = layer_class(method)(torch.nn.Linear(24, 20), AdapterConfig(**settings), AdapterContext())
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            layer.eval()
            up, down = layer.fused_weights()  # (not inference_decoder: it would ask for these kernels)
            up_t, down_t = up.t().contiguous(), down.t().contiguous()
            params = [layer._parameters[name] for name in layer.adapter_param_names]
            decoder = decoder_for(module, layer, up, up_t, down_t, params, loop_tokens=_CHECK_TOKENS[1])
            eager = EagerDecoder(layer, up_t, down_t, params)
            for tokens in _CHECK_TOKENS:
                x = torch.randn(1, tokens, 24, generator=g)
                x[0, -1] = 0.0
                base = torch.randn(1, tokens, 20, generator=g)
                got, expected = decoder.run(base.clone(), x), eager.run(base.clone(), x)
                try:
                    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
                    if expected[1] is not None:
                        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
                    if expected[2] is not None:
                        assert torch.equal(got[2], expected[2]), "the chosen experts differ"
                except AssertionError as exc:
                    detail = " ".join(str(exc).split())[:300]
                    return f"the {method} kernel differs from the eager path ({tokens} tokens: {detail})"
            params[0].add_(1.0)  # an in-place change (an optimizer step) must make the decoder stale
            if decoder.run(base.clone(), x) is not None:
                return f"the {method} kernel does not notice a changed parameter"
    return None


if __name__ == "__main__":  # scripts/setup.sh builds them once: `python -m qmoe.kernels.cpu_decode`
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernels()
    print(f"qmoe CPU inference kernels: {status()}")
