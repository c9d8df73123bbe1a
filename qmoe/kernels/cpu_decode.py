"""qmoe's CPU inference kernels (``cpu_decode.cpp``): each adapter layer's eval-mode forward in one call.

Why: at decode time a CPU spends an adapter layer's time on per-op overhead, not arithmetic (BENCHMARKS.md,
"Generation with adapters attached"): ~15 eager ops per MoELoRA layer, each slower right after bitsandbytes'
4-bit kernel. The C++ functions do the same up-matmul, routing and in-place down-matmul as the layers' eager
fast path (their reference, ``AdapterLayer.forward_inference``) in one call.

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

import torch

from .selfcheck import KernelFallbackWarning

log = logging.getLogger("qmoe")

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
_NAME = "qmoe_cpu_decode"
_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": the checked module or None; "why": why not


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    # the source's hash is part of torch's cache key: an edited kernel is rebuilt, an unchanged one loaded
    log.info("loading qmoe's CPU inference kernels (built on first use: about 30 s, then cached)")
    return load(name=_NAME, sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)


def kernels() -> ModuleType | None:
    """The compiled, self-checked module, or None (after one warning) where it cannot be had."""
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                module, why = None, None
                try:
                    module = _build()
                except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: run eager
                    why = f"it could not be built: {_first_line(exc)}"
                if module is not None:
                    try:
                        why = check(module)
                    except Exception as exc:  # noqa: BLE001 - a kernel that raises is not used either
                        why = f"its self-check raised {_first_line(exc)}"
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


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def status() -> str:
    """One line for ``qmoe doctor``: whether the kernels are in use in this process, or why not."""
    if "module" not in _state:
        return "not loaded yet (built and checked on the first CPU inference forward)"
    return "in use" if _state["module"] is not None else f"not used: {_state['why']}"


def forget() -> None:
    """Drop the loaded module's verdict (tests; the next use loads and checks again)."""
    with _lock:
        _state.clear()


# what the check runs: each method's layer at a small shape class, with routing that is actually exercised
_CHECK_CONFIGS = {
    "lora": dict(method="lora", r=8),
    "moelora": dict(method="moelora", r=4, num_experts=8, top_k=2),
    "loramoe": dict(method="loramoe", r=16, num_experts=4),
    "loracoe": dict(method="loracoe", r=16, num_experts=2, stage="joint"),
}


def check(module: ModuleType) -> str | None:
    """Run every method's kernel once on random weights and inputs (1 and 37 tokens) against the layer's eager
    inference step: None when outputs and routing telemetry all match."""
    from ..config import AdapterConfig
    from ..tuners import layer_class
    from ..tuners.base import AdapterContext

    g = torch.Generator().manual_seed(0)  # a private generator: the check never moves the caller's RNG
    with torch.no_grad():
        for method, settings in _CHECK_CONFIGS.items():
            layer = layer_class(method)(torch.nn.Linear(24, 20), AdapterConfig(**settings), AdapterContext())
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            layer.eval()
            up, down = layer.fused_weights()  # (not inference_weights: it would ask for these kernels)
            up_t, down_t = up.t().contiguous(), down.t().contiguous()
            for tokens in (1, 37):
                x = torch.randn(1, tokens, 24, generator=g)
                flat, base = x.reshape(tokens, 24), torch.randn(tokens, 20, generator=g)
                got, expected = base.clone(), base.clone()
                layer.inference_step(got, flat, up_t, down_t, x, module)
                ran = layer._routing_pending
                layer.inference_step(expected, flat, up_t, down_t, x, None)
                try:
                    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
                    if ran is not None:
                        reference = layer._routing_pending
                        torch.testing.assert_close(ran[0], reference[0], rtol=1e-5, atol=1e-6)
                        if ran[2] is not None:
                            assert torch.equal(ran[2], reference[2]), "the chosen experts differ"
                except AssertionError as exc:
                    detail = " ".join(str(exc).split())[:300]
                    return f"the {method} kernel differs from the eager path ({tokens} tokens: {detail})"
    return None


if __name__ == "__main__":  # scripts/setup.sh builds them once: `python -m qmoe.kernels.cpu_decode`
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kernels()
    print(f"qmoe CPU inference kernels: {status()}")
