"""Inference-only model transformations: a dequantised copy of the frozen 4-bit weights (CPU), and merging a
LoRA adapter into the weights it adapts (``qmoe merge``, ``qmoe chat --merge``).

``dequantize_frozen(model, mode="auto", device="cpu")`` -> bool. bitsandbytes on CPU dequantises every 4-bit
weight again for every forward (every generated token); with ``mode`` 'on' (or 'auto' on CPU when the copy fits
in free RAM) each ``Linear4bit`` is replaced by an ``nn.Linear`` holding exactly the weights bitsandbytes would
dequantise, in the compute dtype: the same function, once instead of per token. Works under attached adapters
(their ``base_layer`` is swapped).

``call_4bit_directly(model, device)``: on CPUs where bitsandbytes multiplies with its bf16 kernel, the frozen 4-bit
layers call that kernel straight from C++ (:class:`Direct4bit`; adapter layers do it inside their own kernel call),
bit-identical to bitsandbytes' forward without the Python around it.

``compile_decode(model, device)``: ``model.generate`` then compiles its decode step (``torch.compile`` of the
whole forward, static KV cache) and adapter layers trace their fast path's eager step (``qmoe chat --compile``);
``prepare_compiled_decode(model)`` refreshes the adapters' fused weights before each generate.

``merge_lora(model)`` -> the model with every LoRA layer replaced by one dense ``nn.Linear`` of W + s·B·A (the
frozen W dequantised when it is 4-bit) and the adapter detached; mixtures are refused (:class:`UsageError`).
"""

from __future__ import annotations

import functools
import logging
import types
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .errors import UsageError
from .kernels.bnb_cpu import frozen_output, hub_kernel_state, kernel_for, linear4bit_class, standard_layout
from .kernels.selfcheck import KernelFallbackWarning, failure_summary

log = logging.getLogger("qmoe")

DEQUANTIZE_MODES = ("auto", "on", "off")
# 'auto' keeps this much of the free RAM for everything else (KV cache, activations, other processes)
_RAM_HEADROOM = 0.25


def _four_bit_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, layer) of every bitsandbytes Linear4bit, adapters' base layers included."""
    cls = linear4bit_class()
    if cls is None:
        return []
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, cls):
                found.append((parent, name, child))
    return found


def dequantized_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` with the weights a bitsandbytes ``Linear4bit`` computes with (its compute dtype)."""
    import bitsandbytes.functional as bnbf

    dtype = dtype or layer.compute_dtype or torch.float32
    # bitsandbytes repacks 4-bit weights for its bf16 CPU kernel at the first eval forward (AVX512-BF16 CPUs);
    # dequantize_4bit reads the standard layout
    data, state = standard_layout(layer.weight.data, layer.weight.quant_state)
    weight = bnbf.dequantize_4bit(data, state).to(dtype)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        dense.bias = nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
    return dense


def dequantized_bytes(model: nn.Module) -> int:
    """Bytes a dequantised copy of every 4-bit layer takes (in each layer's compute dtype)."""
    total = 0
    for _, _, layer in _four_bit_layers(model):
        size = torch.empty((), dtype=layer.compute_dtype or torch.float32).element_size()
        total += layer.in_features * layer.out_features * size
    return total


def free_ram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def bnb_has_bf16_cpu_kernel() -> bool:
    """True where bitsandbytes multiplies 4-bit weights on CPU with a fused bf16 kernel (AVX512-BF16 CPUs; its
    built-in one or the hub's) instead of dequantising each weight per forward."""
    return hub_kernel_state() != "none"


def dequantize_frozen(model: nn.Module, mode: str = "auto", device: str = "cpu") -> bool:
    """Replace the 4-bit layers by dequantised dense ones (see the module docstring); True when it did.

    ``auto``: on CPU only (a GPU's memory is what 4-bit saves), only when the copy fits in free RAM with
    headroom, and only where bitsandbytes has no fused bf16 4-bit CPU kernel: where it has one (AVX512-BF16),
    decoding measured faster on the 4-bit weights than on an fp32 copy (BENCHMARKS.md; prefill is the other
    way round, ``on`` forces the copy). Says what it did in the log."""
    if mode not in DEQUANTIZE_MODES:
        raise UsageError(f"--dequantize {mode!r} is invalid: must be one of {', '.join(DEQUANTIZE_MODES)}")
    layers = _four_bit_layers(model)
    if mode == "off" or not layers:
        return False
    need = dequantized_bytes(model)
    if mode == "auto":
        if device != "cpu":
            return False
        if bnb_has_bf16_cpu_kernel():
            log.info("keeping the 4-bit weights: bitsandbytes' bf16 CPU kernel decodes faster than a dequantised copy")
            return False
        free = free_ram_bytes()
        if need > free * (1 - _RAM_HEADROOM):
            log.info(
                "keeping the 4-bit weights (a dequantised copy needs %.1f GB, %.1f GB of RAM is free); "
                "--dequantize on forces it",
                need / 1e9,
                free / 1e9,
            )
            return False
    for parent, name, layer in layers:
        setattr(parent, name, dequantized_linear(layer))
    log.info(
        "dequantised the frozen 4-bit weights once (%d layers, %.2f GB) instead of on every generated token; "
        "--dequantize off keeps them 4-bit",
        len(layers),
        need / 1e9,
    )
    return True


class Direct4bit(nn.Module):
    """A frozen bitsandbytes ``Linear4bit`` outside any adapter, computed in eval-mode no-grad forwards by
    bitsandbytes' CPU kernel called directly (:mod:`qmoe.kernels.bnb_cpu`): ``Linear4bit.forward``'s result bit for
    bit, without its ~35 µs of Python per call. Anything else (training, autograd, ``torch.compile`` tracing, a
    layer the direct call does not serve) runs the layer's own forward."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.training = base_layer.training  # (wrapping an eval-mode model keeps it in eval mode)
        # (the kernels' Frozen4bit or None where the direct call does not serve it, the layer it was made for), or
        # None: not looked at since the weights changed. Kept in __dict__: read on every call
        self.__dict__["_frozen"] = None
        self.__dict__["_spec"] = None  # (address, blocksize) of the direct call, for compiled graphs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # (a compiled decode step: the direct call as an operator, if it applies)
            spec = self._spec if self.__dict__["_frozen"] is not None else None
            return frozen_output(x, self.base_layer, spec)
        base, held = self._modules["base_layer"], self.__dict__["_frozen"]
        if held is not None and held[1] is not base:  # another layer put in (dequantize_frozen, a load)
            held = self.__dict__["_frozen"] = None
        if held is not None and held[0] is not None and not torch.is_grad_enabled():
            result = held[0].run(x)
            if result is not None:
                return result
            held = self.__dict__["_frozen"] = None  # bitsandbytes repacked or replaced the weights: look again
        result = base(x)  # (the first eval forward is where bitsandbytes repacks for its CPU kernel)
        if held is None and not (self.training or torch.is_grad_enabled()):
            frozen = kernel_for(base)
            self.__dict__["_frozen"] = (frozen, base)
            self.__dict__["_spec"] = (frozen.address, frozen.blocksize) if frozen is not None else None
        return result

    def train(self, mode: bool = True) -> Direct4bit:
        self.__dict__["_frozen"] = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__["_frozen"] = None  # .to() and the like: new tensors
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle: the C++ object (holding the old weights) is made again, not copied
        return {**super().__getstate__(), "_frozen": None}


def call_4bit_directly(model: nn.Module, device: str = "cpu") -> int:
    """Wrap every frozen 4-bit layer that no adapter wraps in :class:`Direct4bit` (adapter layers make the same
    call themselves); the number wrapped. Only where :func:`qmoe.kernels.bnb_cpu.direct_calls_apply` (CPU,
    bitsandbytes' built-in bf16 kernel, not turned off): elsewhere it changes nothing. For inference models only (chat,
    evaluation): the wrapper puts ``base_layer`` into the layers' state-dict keys."""
    from .attach import adapter_layers
    from .kernels.bnb_cpu import direct_calls_apply

    if not direct_calls_apply(device):
        return 0
    adapted = {id(layer.base_layer) for layer in adapter_layers(model).values()}
    layers = [(parent, name, layer) for parent, name, layer in _four_bit_layers(model) if id(layer) not in adapted]
    for parent, name, layer in layers:
        setattr(parent, name, Direct4bit(layer))
    if layers:
        log.info("%d frozen 4-bit layers call bitsandbytes' CPU kernel directly (no Python around it)", len(layers))
    return len(layers)


def unwrap_direct_4bit(model: nn.Module) -> int:
    """Put every :class:`Direct4bit`'s layer back in its place (``qmoe.attach`` does, before wrapping layers with
    adapters: an inference wrapper is not a linear layer to adapt); the number unwrapped."""
    wrapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    wrapped = [(parent, name, child) for parent, name, child in wrapped if isinstance(child, Direct4bit)]
    for parent, name, child in wrapped:
        setattr(parent, name, child.base_layer)
    return len(wrapped)


def prepare_compiled_decode(model: nn.Module) -> int:
    """Fuse each adapter layer's weights for its compiled fast path where missing or stale (a parameter changed);
    the number of layers it (re)built. Cheap when nothing changed: call it before every ``generate``."""
    from .attach import adapter_layers

    return sum(layer.prepare_compiled() for layer in adapter_layers(model).values())


class CompiledDecodeStep:
    """A model's ``forward`` compiled for one-token steps (decode, static KV cache) and eager otherwise: a prompt's
    length changes with every prompt, so compiling prefill would mean one compilation per length, and prefill is a
    single call per reply. transformers' own compiled ``generate`` does the same split but refuses bitsandbytes
    models (their quantizer says "not compileable"); measured on CPU they compile without a graph break
    (BENCHMARKS.md). ``eager`` is set while a reply records routing traces, and for good when compiling fails:
    the step then runs eager after one warning instead of ending the chat."""

    def __init__(
        self,
        forward: Callable,
        mode: str = "default",
        backend: str | Callable = "inductor",
        dynamic: bool | None = None,
    ):
        functools.update_wrapper(self, forward)  # generate reads forward's signature
        self.eager_forward = forward
        # compiled: a copy of forward with its own code object. torch keeps compiled graphs per code object, and every
        # model of a class shares one: several compiled models in a process (a benchmark) would count as recompiles
        # of one function and reach torch's limit (then run eager, silently).
        # dynamic None: the first graph is for the first shapes, and a second, shape-generic one follows when a shape
        # changes (a longer chat outgrowing its KV cache); False: one graph per shape (benchmarks)
        self.compiled_forward = torch.compile(_own_code(forward), mode=mode, backend=backend, dynamic=dynamic)
        self.eager = False
        self.failed: str | None = None  # why compiling failed, once it has
        self.compiled_steps = 0  # one-token forwards the compiled step ran (tests, diagnostics)

    def __call__(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.eager or ids is None or ids.shape[-1] != 1 or torch.is_grad_enabled():
            return self.eager_forward(*args, **kwargs)
        try:
            out = self.compiled_forward(*args, **kwargs)
            self.compiled_steps += 1
            return out
        except Exception as exc:  # noqa: BLE001 - a compiler failure (no C++ compiler, an unsupported op): run eager
            self.failed, self.eager = failure_summary(exc), True
            warnings.warn(
                f"the compiled decode step failed ({self.failed}); decoding eagerly from here on",
                KernelFallbackWarning,
                stacklevel=2,
            )
            return self.eager_forward(*args, **kwargs)


def _own_code(method: Callable) -> Callable:
    """A bound method's function copied with a code object of its own, bound to the same instance."""
    if not isinstance(method, types.MethodType):
        return method
    fn = method.__func__
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__, own.__dict__ = fn.__kwdefaults__, dict(fn.__dict__)
    return types.MethodType(own, method.__self__)


def compile_decode(model: nn.Module, device: str, dynamic: bool | None = None) -> CompiledDecodeStep:
    """Make ``model.generate`` run a compiled decode step with a static KV cache (see the module docstring and
    :class:`CompiledDecodeStep`); the compilation happens in the first decode step (tens of seconds on a CPU;
    torch caches the artefacts on disk). Compiled adapter layers record no routing: set ``.eager`` on the returned
    step while a generate must trace it."""
    prepare_compiled_decode(model)
    # a static cache sized by generate (prompt + new tokens, reused while later replies fit): attention runs over the
    # whole cache every step, and measured on CPU a 1024-token cache made compiled decoding slower than eager
    model.generation_config.cache_implementation = "static"
    step = model.forward
    if not isinstance(step, CompiledDecodeStep):
        step = CompiledDecodeStep(model.forward, dynamic=dynamic)
        model.forward = step
    return step


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight (dequantised first when 4-bit) and detach the adapter.

    The result is a model without qmoe layers whose forward equals the adapted model's up to float rounding."""
    from .attach import adapter_config, adapter_layers, detach

    config = adapter_config(model)
    if config is None:
        raise UsageError("no adapter to merge: the model has none attached")
    if config.method != "lora":
        raise UsageError(
            f"a {config.method} adapter cannot be merged: its experts are mixed by input-dependent routing, so its "
            "update is not one fixed weight matrix; chat with it unmerged (only lora adapters merge)"
        )
    four_bit = linear4bit_class()
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            base = layer.base_layer
            dense = dequantized_linear(base) if four_bit is not None and isinstance(base, four_bit) else base
            delta = (layer.lora_B.float() @ layer.lora_A.float()) * layer.scale
            dense.weight.add_(delta.to(dense.weight.dtype))
            layer.base_layer = dense
    return detach(model)


def note_merge_on_4bit_cpu(model: nn.Module, device: str) -> bool:
    """Log (and return True) when a merged LoRA runs on a CPU whose other frozen weights stay 4-bit because
    bitsandbytes' bf16 kernel serves them: there the merge's dense layers decode slower than the unmerged adapter
    (BENCHMARKS.md, rows ``lora-merged`` and ``lora``). Merged layers stay dense on purpose: re-quantising W + s·B·A
    to NF4 rounds most of the adapter's update away (``benchmarks/requantized_merge.py``)."""
    if device != "cpu" or not _four_bit_layers(model) or not bnb_has_bf16_cpu_kernel():
        return False
    log.info(
        "merged: the adapted layers are now dense float32; on this CPU bitsandbytes' bf16 kernel decodes the 4-bit "
        "layers faster than dense ones, so chatting without --merge is faster here (the merge does not "
        "re-quantise to 4-bit: NF4 rounding would erase most of the adapter's update)"
    )
    return True


def drop_quantization_config(model: nn.Module) -> None:
    """Mark a model whose 4-bit layers were all dequantised as a plain one (so save_pretrained writes a
    folder AutoModelForCausalLM loads without bitsandbytes)."""
    model.hf_quantizer = None
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:  # a read-only property in some transformers versions
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
