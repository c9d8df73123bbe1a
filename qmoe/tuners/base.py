"""What every adapter layer shares: wrapping the frozen base linear, dtype/device, dropout, the padding mask,
routing telemetry and auxiliary-loss bookkeeping."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ..kernels import bnb_cpu, requested_backend
from ..kernels.bnb_cpu import frozen_output

if TYPE_CHECKING:  # (qmoe.config imports the tuners' defaults)
    from ..config import AdapterConfig


@dataclass
class AdapterContext:
    """State shared by all adapter layers of one model, set by a forward pre-hook on the model."""

    attention_mask: torch.Tensor | None = None  # [batch, seq] of the current forward, or None
    trace: bool = False  # record per-token routing (inference telemetry)
    # the kernel backend (qmoe.kernels.requested_backend) read once per model forward instead of once per layer
    # call; None outside a model forward (a layer called on its own asks requested_backend itself)
    backend: str | None = None


def in_recomputation() -> bool:
    """True while autograd's engine runs, i.e. when gradient checkpointing re-executes a forward.

    Layers then reproduce the original forward (same queue snapshot) and leave telemetry and aux losses alone,
    so checkpointing on and off give identical losses and gradients.
    """
    return torch._C._current_graph_task_id() != -1


# Inference fast path (eval mode, no autograd): fused weights cached between calls, the fewest ops per layer,
# telemetry deferred until read. QMOE_FAST_INFERENCE=0 or set_fast_inference(False) runs the training code path
# (the reference the fast one is tested against).
_fast_inference = os.environ.get("QMOE_FAST_INFERENCE", "1").strip() not in ("0", "false", "no")


def set_fast_inference(enabled: bool) -> None:
    """Use the inference fast path in eval-mode no-grad forwards (default on) or always the reference path."""
    global _fast_inference
    _fast_inference = bool(enabled)


def fast_inference_enabled() -> bool:
    return _fast_inference


def cpu_kernels_for(weights: torch.Tensor) -> ModuleType | None:
    """qmoe's CPU inference kernels (:mod:`qmoe.kernels.cpu_decode`) for float32 CPU weights under
    ``QMOE_KERNELS=auto``, when they could be built and passed their self-check; else None (eager)."""
    if weights.device.type != "cpu" or weights.dtype != torch.float32 or requested_backend() != "auto":
        return None
    from ..kernels import cpu_decode

    return cpu_decode.kernels()


def base_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base layer computes in: ``compute_dtype`` for bitsandbytes 4-bit, the weight's otherwise."""
    compute = getattr(base, "compute_dtype", None)
    if compute is not None:
        return compute
    weight = base.weight
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


def base_device(base: nn.Module) -> torch.device:
    return base.weight.device


def _valid_mask(mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Bool mask over the flattened tokens of an input of ``shape`` ([..., seq, in]) that are not padding."""
    if mask is None or len(shape) < 3:
        return None
    seq = shape[-2]
    if mask.shape[0] != shape[0] or mask.shape[-1] < seq:
        return None
    # with a KV cache the mask covers past + current tokens; the current ones are the last `seq`
    return mask[:, -seq:].reshape(-1).to(device=device, dtype=torch.bool)


class AdapterLayer(nn.Module):
    """Base class: ``forward(x) = base_layer(x) + delta(x)``; subclasses implement ``delta``."""

    # names of the adapter's parameters (what save_adapter writes)
    adapter_param_names: tuple[str, ...] = ()
    # routed methods report per-expert load
    routed: bool = False

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, context: AdapterContext):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.context = context
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale
        # telemetry of the last forward: detached, never part of the autograd graph; computed from
        # ``_routing_pending`` (what record_routing kept) when first read, so forwards nobody reads cost nothing
        self._routing_pending: tuple | None = None
        self._telemetry: tuple[torch.Tensor | None, torch.Tensor | None, int] = (None, None, 0)
        self.trace_records: list[dict] = []
        # inference fast path: (kernel backend, decoder, the frozen layer it computes itself or None) with the
        # weights fused from the adapter parameters; the decoder says when they changed (returns None), is rebuilt
        self._inference_cache: tuple[str, Decoder, nn.Module | None] | None = None
        # what forward_compiled reads under torch.compile: (its two compiled_weights, parameter stamp, the frozen
        # layer's direct-call spec or None)
        self._compiled_weights: tuple[torch.Tensor, torch.Tensor, list, tuple[int, int] | None] | None = None
        # auxiliary losses of the last training forward, by name: tensors in the graph, or zero-argument callables
        # that compute one when first asked (aux_losses), outside gradient checkpointing's recomputed region
        self.aux: dict[str, torch.Tensor | Callable[[], torch.Tensor]] = {}

    # ---- helpers for subclasses -------------------------------------------------------------------------
    def _new_param(self, *shape: int) -> nn.Parameter:
        dtype, device = base_dtype(self.base_layer), base_device(self.base_layer)
        return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))

    @staticmethod
    def _kaiming_(weight: torch.Tensor) -> None:
        # PEFT's LoRA A init (kaiming uniform, a=sqrt(5)): rows independent of the rank
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def valid_token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """Bool mask over the flattened tokens of ``x`` ([..., seq, in]) that are not padding, or None."""
        return _valid_mask(self.context.attention_mask, x.shape, x.device)

    def record_routing(
        self, weights: torch.Tensor, valid: torch.Tensor | None, chosen: torch.Tensor | None = None
    ) -> None:
        """Routing telemetry of this forward, off the autograd graph (the one definition for every method).

        ``weights`` [T, E]: dense routing weights per token (the gate, softmax or rank weights). ``chosen``
        [T, k]: the experts each token was sent to (top-k methods); then ``load`` is the fraction of routed
        token-slots per expert. Without it (dense methods) a token counts for its most weighted expert and
        ``load`` is the mean weight. Padding (``valid`` False) is excluded; traces keep every token.
        """
        if not torch.is_grad_enabled():  # (no autograd: nothing to detach)
            self._routing_pending = (weights, valid, chosen)
            if self.context.trace:
                # kept on the device; qmoe.routing moves traces to the CPU when read (no sync per layer and token)
                self.trace_records.append({"weights": weights})
            return
        # meta tensors (qmoe.plan's shape-only forward): telemetry keeps nothing for backward, and bincount has
        # no meta kernel
        if in_recomputation() or weights.device.type == "meta":
            return
        self._routing_pending = (weights.detach(), valid, None if chosen is None else chosen.detach())

    def _routing_telemetry(self) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(counts, load, tokens) of the last recorded forward, computed from what record_routing kept."""
        if self._routing_pending is not None:
            weights, valid, chosen = self._routing_pending
            self._routing_pending = None
            if isinstance(valid, tuple):  # (attention mask, input shape): the fast path's deferred padding mask
                valid = _valid_mask(valid[0], valid[1], weights.device)
            with torch.no_grad():
                experts = weights.shape[-1]
                w = weights if valid is None else weights[valid]
                ids = w.argmax(-1) if chosen is None else (chosen if valid is None else chosen[valid])
                counts = torch.bincount(ids.reshape(-1), minlength=experts)
                if w.shape[0] == 0:  # nothing but padding: an even split, on the tensor's own device
                    load = torch.full((experts,), 1.0 / experts, device=weights.device)
                elif chosen is None:
                    load = w.float().mean(0)
                else:
                    load = counts.float() / counts.sum()
                self._telemetry = (counts, load, w.shape[0])
        return self._telemetry

    @property
    def last_counts(self) -> torch.Tensor | None:
        return self._routing_telemetry()[0]

    @property
    def last_load(self) -> torch.Tensor | None:
        return self._routing_telemetry()[1]

    @property
    def last_tokens(self) -> int:
        return self._routing_telemetry()[2]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """The auxiliary losses of the last training forward, computing deferred ones once."""
        for name, value in self.aux.items():
            if callable(value):
                self.aux[name] = value()
        return self.aux

    def _set_aux(self, **losses: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        if in_recomputation():
            return
        self.aux = losses

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not _fast_inference or self.training or torch.is_grad_enabled():
            return self.forward_reference(x, *args, **kwargs)
        if torch.compiler.is_compiling():
            return self.forward_compiled(x, *args, **kwargs)
        # The inference fast path: the same function as forward_reference up to float rounding, with the weights
        # fused once, no dropout, the adapter's output added into the base layer's result in place. Written
        # inline and short: at decode time every line here runs per adapted layer per token, several times
        # slower than in isolation because bitsandbytes' kernel has just evicted the caches (BENCHMARKS.md).
        ctx = self.context
        backend = ctx.backend or requested_backend()
        cache = self._inference_cache
        ran = None
        if cache is not None and cache[0] == backend:
            frozen = cache[2]
            if frozen is not None and frozen is self.base_layer:  # (not swapped since: dequantize_frozen)
                ran = cache[1].run_frozen(x)  # the frozen 4-bit layer and the adapter in one C++ call
            else:
                ran = cache[1].run(self.base_layer(x, *args, **kwargs), x)
        if ran is None:  # first call, a parameter changed (optimizer step, load), or another kernel backend
            result = self.base_layer(x, *args, **kwargs)  # (first: bitsandbytes repacks for its CPU kernel here)
            ran = self.inference_decoder(backend).run(result, x)
        if ran[1] is not None:
            # record_routing's inference branch, inlined; __dict__ skips nn.Module.__setattr__'s lookups
            self.__dict__["_routing_pending"] = (ran[1], (ctx.attention_mask, x.shape), ran[2])
            if ctx.trace:  # (a copy: qmoe's CPU kernel reuses a one-token call's buffers)
                self.trace_records.append({"weights": ran[1].clone()})
        return ran[0]

    def forward_compiled(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The fast path as ``torch.compile`` traces it (``qmoe.inference.compile_decode``): the method's
        :meth:`compiled_step` (by default its eager :meth:`inference_step`) on the fused weights
        :meth:`prepare_compiled` made (without them, fused inside the graph: correct, but redone every step), no
        C++ kernel call (opaque to the compiler) and no routing telemetry (a per-layer side effect the graph would
        have to replay; traced chat replies run uncompiled).
        The frozen layer: bitsandbytes' CPU kernel called directly, as an operator, where :meth:`prepare_compiled`
        found that it applies (:func:`qmoe.kernels.bnb_cpu.frozen_output`), else its forward."""
        held = self._compiled_weights
        if held is None:
            result = self.base_layer(x, *args, **kwargs)
            first, second = self.compiled_weights(*self.fused_weights())
        else:
            result = frozen_output(x, self.base_layer, held[3])  # (spec None: the layer's forward)
            first, second = held[0], held[1]
        flat = x.reshape(-1, self.in_features).to(second.dtype)
        return add_adapter_output(self.compiled_step, result, flat, x.shape, first, second)[0]

    def compiled_weights(self, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`fused_weights` laid out as :meth:`compiled_step` reads them: by default :meth:`inference_step`'s
        (up^T, down^T), contiguous."""
        return up.t().contiguous(), down.t().contiguous()

    def compiled_step(
        self, out: torch.Tensor, flat: torch.Tensor, first: torch.Tensor, second: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The adapter step :meth:`forward_compiled` traces, on :meth:`compiled_weights`: by default the eager
        :meth:`inference_step`."""
        return self.inference_step(out, flat, first, second)

    def prepare_compiled(self) -> bool:
        """Fuse the weights :meth:`forward_compiled` reads, unless those already held match the parameters (their
        in-place versions and storage); True when it (re)built them. New tensors make a compiled graph that read
        the old ones recompile (its guards check them), so a changed adapter is never served stale."""
        stamp = parameter_stamp([self._parameters[name] for name in self.adapter_param_names])
        spec = bnb_cpu.compiled_spec(self.base_layer)
        held = self._compiled_weights
        if held is not None and held[2] == stamp and held[3] == spec:
            return False
        with torch.no_grad():
            self.__dict__["_compiled_weights"] = (*self.compiled_weights(*self.fused_weights()), stamp, spec)
        return True

    def forward_reference(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The training code path (autograd, dropout, auxiliary losses); any mode."""
        result = self.base_layer(x, *args, **kwargs)
        dtype = self.adapter_dtype
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        delta = self.delta(self.dropout(flat), self.valid_token_mask(x))
        return result + delta.reshape(*x.shape[:-1], self.out_features).to(result.dtype)

    @property
    def adapter_dtype(self) -> torch.dtype:
        return getattr(self, self.adapter_param_names[0]).dtype

    def delta(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # ---- inference fast path ----------------------------------------------------------------------------
    # What a method defines: fused_weights (its weights for the fast path), inference_step (its eager step) and
    # decoder_spec (how qmoe's CPU kernel runs it). The Decoder (qmoe.kernels.cpu_decode on float32 CPU weights,
    # EagerDecoder otherwise) holds the fused weights and runs them.
    def inference_step(
        self, out: torch.Tensor, flat: torch.Tensor, up_t: torch.Tensor, down_t: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``out`` [T, out] += the adapter's output for ``flat`` [T, in], in eager PyTorch (the reference of
        qmoe's CPU kernel); returns (routing weights [T, E] or None, chosen experts [T, k] or None) for the
        telemetry. By default LoRA's: out += (flat @ A^T) @ (s B)^T."""
        out.addmm_(torch.mm(flat, up_t), down_t)
        return None, None

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [R', in], down [out, R]) for the fast path, built from the parameters: by default LoRA's A and
        scale * B. Routed methods stack their router onto ``up``; constant factors of the routing fold into
        ``down``."""
        return self.lora_A.detach(), self.lora_B.detach() * self.scale

    def decoder_spec(self) -> tuple[str, int, int, int]:
        """(method, n, r, k) of qmoe's CPU kernel for :meth:`fused_weights`: the routing between its two matmuls
        (``lora``: none) and its shape (experts, rank, top-k)."""
        return "lora", 0, 0, 0

    def inference_decoder(self, backend: str) -> Decoder:
        """The decoder for the current parameters and kernel backend, built now and cached until a parameter
        changes: qmoe's CPU kernel for float32 CPU weights under ``auto``, else :class:`EagerDecoder`. Its
        weights are contiguous (a transposed view sends a small CPU matmul down a path ~10x slower). qmoe's CPU
        kernel also computes the frozen layer from the next call on, where that layer is a bitsandbytes 4-bit
        layer its CPU kernel serves (:func:`qmoe.kernels.bnb_cpu.frozen_kernel`)."""
        frozen_base = None
        with torch.no_grad():
            up, down = self.fused_weights()
            up_t, down_t = up.t().contiguous(), down.t().contiguous()
            params = [self._parameters[name] for name in self.adapter_param_names]
            kernels = cpu_kernels_for(up) if backend == "auto" else None
            if kernels is not None:
                from ..kernels.bnb_cpu import frozen_kernel
                from ..kernels.cpu_decode import decoder_for

                decoder = decoder_for(kernels, self, up, up_t, down_t, params)
                frozen = frozen_kernel(kernels, self.base_layer)
                if frozen is not None:
                    decoder.attach_frozen(frozen)
                    frozen_base = self.base_layer
            else:
                decoder = EagerDecoder(self, up_t, down_t, params)
        self._inference_cache = (backend, decoder, frozen_base)
        return decoder

    def _drop_inference_cache(self) -> None:
        self.__dict__["_inference_cache"] = None  # (also called from register_parameter during __init__)
        self.__dict__["_compiled_weights"] = None

    def train(self, mode: bool = True) -> AdapterLayer:
        self._drop_inference_cache()  # back to training: the parameters will change; free the fused copy
        return super().train(mode)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        # a parameter replaced by another object (setattr, load_state_dict(assign=True)): the decoder holds the
        # old one, whose version no longer says anything
        self._drop_inference_cache()
        super().register_parameter(name, param)

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle: the decoder (a C++ object holding the old parameters) is rebuilt, not copied
        return {**super().__getstate__(), "_inference_cache": None, "_compiled_weights": None}

    def _apply(self, fn, recurse: bool = True):
        self._drop_inference_cache()  # .to(), .half(), .cuda(): new tensors, maybe new Parameter objects
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        c = self.config
        extra = f", experts={c.num_experts}" if c.num_experts else ""
        return f"method={c.method}, r={c.r}, alpha={c.alpha}{extra}"


class Decoder(Protocol):
    """What :meth:`AdapterLayer.inference_decoder` returns: one layer's fused weights, run per forward."""

    def run(
        self, result: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """``result`` (the frozen layer's output) plus the adapter's output for ``x``, in place where it can:
        (result, routing weights or None, chosen experts or None), or None, doing nothing, when a parameter
        changed since the weights were fused. The routing tensors may be overwritten by the next call (qmoe's CPU
        kernel reuses its buffers for one-token calls): copy what must outlive it."""


class EagerDecoder:
    """The fast path in eager PyTorch: the layer's :meth:`~AdapterLayer.inference_step` on the fused weights,
    for CUDA (where the step may call a Triton kernel), other dtypes, ``QMOE_KERNELS=torch``, or when qmoe's CPU
    kernels cannot be had; the reference they are tested against."""

    def __init__(self, layer: AdapterLayer, up_t: torch.Tensor, down_t: torch.Tensor, params: list[nn.Parameter]):
        self.step, self.up_t, self.down_t, self.params = layer.inference_step, up_t, down_t, params
        self.in_features, self.out_features = up_t.shape[0], down_t.shape[1]
        self.stamp = parameter_stamp(params)

    def run(self, result: torch.Tensor, x: torch.Tensor):
        if parameter_stamp(self.params) != self.stamp:
            return None
        up_t = self.up_t
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != up_t.dtype:
            flat = flat.to(up_t.dtype)
        if result.dtype == up_t.dtype and result.is_contiguous():
            return result, *self.step(result.view(-1, self.out_features), flat, up_t, self.down_t)
        return add_adapter_output(self.step, result, flat, x.shape, up_t, self.down_t)


def parameter_stamp(params: list[nn.Parameter]) -> list[tuple[int, int]]:
    """What fused weights were built from: each parameter's in-place version and storage. A different stamp later
    means a parameter changed in place (an optimizer step, a load) or was given new storage."""
    return [(p._version, p.data_ptr()) for p in params]


def add_adapter_output(step, result: torch.Tensor, flat: torch.Tensor, shape, up_t: torch.Tensor, down_t: torch.Tensor):
    """``result`` + the adapter's output for ``flat`` (the input [T, in] of shape ``shape``), out of place (another
    dtype or layout than the weights', or under torch.compile): (sum, routing weights or None, chosen or None)
    from the layer's inference ``step``."""
    delta = flat.new_zeros(flat.shape[0], down_t.shape[1])
    telemetry = step(delta, flat, up_t, down_t)
    return result + delta.view(*shape[:-1], down_t.shape[1]).to(result.dtype), *telemetry
