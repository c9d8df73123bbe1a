"""What every adapter layer shares: wrapping the frozen base linear, dtype/device, dropout, the padding mask,
routing telemetry and auxiliary-loss bookkeeping."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

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


def base_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base layer computes in: ``compute_dtype`` for bitsandbytes 4-bit, the weight's otherwise."""
    compute = getattr(base, "compute_dtype", None)
    if compute is not None:
        return compute
    weight = base.weight
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


def base_device(base: nn.Module) -> torch.device:
    return base.weight.device


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
        # telemetry of the last forward: detached, never part of the autograd graph
        self.last_counts: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.last_tokens: int = 0
        self.trace_records: list[dict] = []
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
        mask = self.context.attention_mask
        if mask is None or x.dim() < 3:
            return None
        seq = x.shape[-2]
        if mask.shape[0] != x.shape[0] or mask.shape[-1] < seq:
            return None
        # with a KV cache the mask covers past + current tokens; the current ones are the last `seq`
        return mask[:, -seq:].reshape(-1).to(device=x.device, dtype=torch.bool)

    def record_routing(
        self, weights: torch.Tensor, valid: torch.Tensor | None, chosen: torch.Tensor | None = None
    ) -> None:
        """Routing telemetry of this forward, off the autograd graph (the one definition for every method).

        ``weights`` [T, E]: dense routing weights per token (the gate, softmax or rank weights). ``chosen``
        [T, k]: the experts each token was sent to (top-k methods); then ``load`` is the fraction of routed
        token-slots per expert. Without it (dense methods) a token counts for its most weighted expert and
        ``load`` is the mean weight. Padding (``valid`` False) is excluded; traces keep every token.
        """
        if in_recomputation():
            return
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
            self.last_counts, self.last_load, self.last_tokens = counts, load, w.shape[0]
            if self.context.trace and not torch.is_grad_enabled():
                self.trace_records.append({"weights": weights.float().cpu()})

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

    def extra_repr(self) -> str:
        c = self.config
        extra = f", experts={c.num_experts}" if c.num_experts else ""
        return f"method={c.method}, r={c.r}, alpha={c.alpha}{extra}"
