"""What every adapter layer shares: wrapping the frozen base linear, dtype/device, dropout, the padding mask,
routing telemetry and auxiliary-loss bookkeeping."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..kernels import requested_backend

if TYPE_CHECKING:  # (qmoe.config imports the tuners' defaults)
    from ..config import AdapterConfig


@dataclass
class AdapterContext:
    """State shared by all adapter layers of one model, set by a forward pre-hook on the model."""

    attention_mask: torch.Tensor | None = None  # [batch, seq] of the current forward, or None
    trace: bool = False  # record per-token routing (inference telemetry)


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
        # inference fast path: (key, fused weights) built from the adapter parameters, rebuilt when they change
        self._inference_cache: tuple | None = None
        self._cpu_kernels: ModuleType | None = None  # qmoe.kernels.cpu_decode where it serves these weights
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

    def deferred_valid_mask(self, x: torch.Tensor) -> Callable[[], torch.Tensor | None] | None:
        """:meth:`valid_token_mask` for record_routing, computed only if the telemetry is read."""
        mask, shape, device = self.context.attention_mask, x.shape, x.device
        return None if mask is None else (lambda: _valid_mask(mask, shape, device))

    def record_routing(
        self, weights: torch.Tensor, valid: torch.Tensor | None, chosen: torch.Tensor | None = None
    ) -> None:
        """Routing telemetry of this forward, off the autograd graph (the one definition for every method).

        ``weights`` [T, E]: dense routing weights per token (the gate, softmax or rank weights). ``chosen``
        [T, k]: the experts each token was sent to (top-k methods); then ``load`` is the fraction of routed
        token-slots per expert. Without it (dense methods) a token counts for its most weighted expert and
        ``load`` is the mean weight. Padding (``valid`` False) is excluded; traces keep every token.
        """
        if not torch.is_grad_enabled():  # (inference: nothing to detach; checked first, it is the hot path)
            self._routing_pending = (weights, valid, chosen)
            if self.context.trace:
                # kept on the device; qmoe.routing moves traces to the CPU when read (no sync per layer and token)
                self.trace_records.append({"weights": weights})
            return
        # meta tensors (qmoe.plan's shape-only forward): telemetry keeps nothing for backward, and bincount has
        # no meta kernel
        if in_recomputation() or weights.device.type == "meta":
            return
        # ``valid`` may be a zero-argument callable (the fast path defers even the padding mask)
        self._routing_pending = (weights.detach(), valid, None if chosen is None else chosen.detach())

    def _routing_telemetry(self) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(counts, load, tokens) of the last recorded forward, computed from what record_routing kept."""
        if self._routing_pending is not None:
            weights, valid, chosen = self._routing_pending
            self._routing_pending = None
            if callable(valid):
                valid = valid()
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
        if _fast_inference and not self.training and not torch.is_grad_enabled():
            return self.forward_inference(x, *args, **kwargs)
        return self.forward_reference(x, *args, **kwargs)

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
    def forward_inference(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Eval-mode no-grad forward: the same function as :meth:`forward_reference` (up to float rounding)
        with the weights fused once (:meth:`inference_weights`), no dropout, and the output matmul added
        into the base layer's result in place (:meth:`inference_step`)."""
        result = self.base_layer(x, *args, **kwargs)
        up_t, down_t = self.inference_weights()
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != up_t.dtype:
            flat = flat.to(up_t.dtype)
        if result.dtype == up_t.dtype and result.is_contiguous():
            self.inference_step(result.view(-1, self.out_features), flat, up_t, down_t, x, self._cpu_kernels)
            return result
        delta = flat.new_zeros(flat.shape[0], self.out_features)
        self.inference_step(delta, flat, up_t, down_t, x, self._cpu_kernels)
        return result + delta.view(*x.shape[:-1], self.out_features).to(result.dtype)

    def inference_step(
        self,
        out: torch.Tensor,
        flat: torch.Tensor,
        up_t: torch.Tensor,
        down_t: torch.Tensor,
        x: torch.Tensor,
        kernels: ModuleType | None,
    ) -> None:
        """``out`` [T, out] += the adapter's output for ``flat`` [T, in] (routing telemetry recorded here):
        one call of qmoe's CPU kernel where ``kernels`` is given, else eager PyTorch (its reference). By
        default LoRA's: out += (flat @ A^T) @ (s B)^T."""
        if kernels is not None:
            kernels.lora(out, flat, up_t, down_t)
        else:
            out.addmm_(torch.mm(flat, up_t), down_t)

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [R', in], down [out, R]) for the fast path, built from the parameters: by default LoRA's A and
        scale * B. Routed methods stack their router onto ``up``; constant factors of the routing fold into
        ``down``."""
        return self.lora_A.detach(), self.lora_B.detach() * self.scale

    def inference_key(self) -> tuple:
        """What the fused weights depend on: the kernel backend, each parameter's storage and in-place version
        (optimizer steps, load_state_dict and copy_ bump it; a move to another device is a new storage) and
        dtype, plus what subclasses add (e.g. LoRACoE's stage)."""
        params = self._parameters  # (not getattr: nn.Module's __getattr__ is slow on this per-token path)
        return (
            requested_backend(),
            *[(params[n].data_ptr(), params[n]._version, params[n].dtype) for n in self.adapter_param_names],
        )

    def inference_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up^T [in, R'], down^T [R, out]), both contiguous (a transposed view sends a small CPU matmul down a
        path ~10x slower), cached until :meth:`inference_key` changes."""
        key = self.inference_key()
        cache = self._inference_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                up, down = self.fused_weights()
                cache = self._inference_cache = (key, (up.t().contiguous(), down.t().contiguous()))
                self._cpu_kernels = cpu_kernels_for(cache[1][0])
        return cache[1]

    def train(self, mode: bool = True) -> AdapterLayer:
        self._inference_cache = None  # back to training: the parameters will change; free the fused copy
        return super().train(mode)

    def extra_repr(self) -> str:
        c = self.config
        extra = f", experts={c.num_experts}" if c.num_experts else ""
        return f"method={c.method}, r={c.r}, alpha={c.alpha}{extra}"
