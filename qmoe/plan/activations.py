"""Activation memory, measured: one training forward (and loss) of the real architecture on meta tensors,
summing the unique storages autograd keeps for backward (``torch.autograd.graph.saved_tensors_hooks``).

Each saved storage is attributed to the decoder layer that saved it (or to none: embeddings, final norm, LM
head, loss, the deferred MoELoRA contrastive loss), and each layer's inputs are recorded. That gives both
checkpointing modes from one forward:

- off: every storage saved anywhere;
- on (non-reentrant, per decoder layer): what is saved outside the layers, plus each layer's checkpoint
  inputs (its hidden states, and the shared rotary tables and mask once), plus at the backward peak one
  recomputed layer's own saved tensors.

A model of homogeneous layers is measured cut to :data:`MEASURED_LAYERS` decoder layers; the last measured
layer stands for each further one (what it adds is what every further layer adds).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .shapes import attach_meta, decoder_layers, homogeneous, meta_model

MEASURED_LAYERS = 2
_OUTSIDE = -1


def _bincount_meta(ids: torch.Tensor, weights: torch.Tensor | None = None, minlength: int = 0) -> torch.Tensor:
    # aten::bincount has no meta kernel (its length depends on the values). qmoe counts expert ids, always
    # below minlength (the number of experts), so the shape is (minlength,)
    dtype = torch.int64 if weights is None else torch.double if weights.dtype != torch.float else weights.dtype
    return ids.new_empty((max(minlength, 1),), dtype=dtype)


_LIB = torch.library.Library("aten", "IMPL")
_LIB.impl("bincount", _bincount_meta, "Meta")


def _fused_sdpa(device: str) -> Callable[..., torch.Tensor]:
    """``F.scaled_dot_product_attention`` as it runs on ``device`` with a padding mask, for meta tensors.

    On meta, sdpa takes its math path, which keeps the [batch, heads, length, length] probabilities for
    backward; a real CPU or GPU runs a fused kernel that keeps q, k, v, the output and the log-sum-exp (CPU:
    flash attention for CPU; CUDA: memory-efficient attention, the fused kernel that takes a mask), plus the
    mask, which sdpa converts from bool to an additive mask of q's dtype at each call."""
    aten = torch.ops.aten

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = query.new_zeros(attn_mask.shape).masked_fill(~attn_mask, float("-inf"))
        if device == "cuda":
            return aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
            )[0]
        return aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[0]

    return sdpa


@contextlib.contextmanager
def fused_attention(device: str):
    """Within: transformers' sdpa attention runs the fused kernel of ``device`` on meta tensors."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa(device)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _key(t: torch.Tensor) -> int:
    # storage identity (a meta storage has no data pointer to tell it apart)
    return t.untyped_storage()._cdata


def _size(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@dataclass
class SavedTensors:
    """What one training forward kept, by storage: the bytes of each storage autograd saved, which of them
    each decoder layer saved, and each layer's checkpoint inputs (storage: bytes)."""

    saved: dict[int, int] = field(default_factory=dict)
    by_layer: list[set[int]] = field(default_factory=list)
    inputs: list[dict[int, int]] = field(default_factory=list)
    # saved by a layer's deferred losses (MoELoRA's contrastive loss), computed after the forward: outside
    # the recomputed region, so kept whatever the checkpointing mode
    deferred: list[set[int]] = field(default_factory=list)

    def bytes(self, keys: Iterable[int]) -> int:
        sizes = {**self.saved, **{k: v for layer in self.inputs for k, v in layer.items()}}
        return sum(sizes[k] for k in set(keys))

    def outside(self) -> set[int]:
        """Storages no decoder layer saved (embeddings, final norm, LM head, loss), deferred losses included."""
        return set(self.saved) - set().union(*self.by_layer)


def record_saved(model: nn.Module, inputs: dict[str, torch.Tensor]) -> SavedTensors:
    """One training forward and loss of ``model`` (:func:`training_forward`), recording what autograd saves
    and still holds once the loss is computed, excluding the model's parameters and buffers (counted as
    weights).

    A tensor saved by a branch of the graph that is then discarded (telemetry, say) is freed before backward:
    it is dropped when the object autograd holds dies (the packed tensor itself: pack returns it). Layer
    inputs are held until the end, so no storage address is reused while recording."""
    layers = decoder_layers(model)
    held: list[torch.Tensor] = []
    alive: dict[int, int] = {}  # storage -> packed tensors of it still held by autograd
    recording = [True]
    excluded = {_key(t) for t in [*model.parameters(), *model.buffers()]}
    saved = SavedTensors(
        by_layer=[set() for _ in layers], inputs=[{} for _ in layers], deferred=[set() for _ in layers]
    )
    current = [_OUTSIDE]
    deferred = [_OUTSIDE]
    handles = []

    def enter(index: int):
        def hook(module, args, kwargs):
            current[0] = index
            for value in [*args, *kwargs.values()]:
                if isinstance(value, torch.Tensor):
                    saved.inputs[index][_key(value)] = _size(value)
                    held.append(value)

        return hook

    def leave(module, args, output):
        current[0] = _OUTSIDE

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave))

    def release(key: int) -> None:
        if not recording[0]:
            return
        alive[key] -= 1
        if alive[key] == 0:  # the graph that saved it is gone: not kept for backward
            del alive[key]
            saved.saved.pop(key, None)
            for group in (*saved.by_layer, *saved.deferred):
                group.discard(key)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        if key not in excluded:
            alive[key] = alive.get(key, 0) + 1
            weakref.finalize(t, release, key)
            saved.saved[key] = _size(t)
            if current[0] != _OUTSIDE:
                saved.by_layer[current[0]].add(key)
            elif deferred[0] != _OUTSIDE:
                saved.deferred[deferred[0]].add(key)
        return t

    def deferred_losses() -> None:  # each layer's, attributed to it (aux_loss then reuses them)
        from ..tuners.base import AdapterLayer

        for index, layer in enumerate(layers):
            deferred[0] = index
            for module in layer.modules():
                if isinstance(module, AdapterLayer):
                    module.aux_losses()
        deferred[0] = _OUTSIDE

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = training_forward(model, inputs, before_aux=deferred_losses)
        recording[0] = False  # what is saved now is what backward needs; then the graph may go
        del loss
    finally:
        recording[0] = False
        for handle in handles:
            handle.remove()
    return saved


def combine(saved: SavedTensors, layers_total: int, checkpointing: bool) -> int:
    """Bytes kept for backward at the peak for ``layers_total`` decoder layers, of which ``saved`` measured
    the first ``len(saved.by_layer)`` (see the module docstring)."""
    extra = layers_total - len(saved.by_layer)
    earlier = set().union(*saved.by_layer[:-1], *saved.deferred[:-1])
    outside = saved.outside()
    last = saved.deferred[-1] - earlier
    if not checkpointing:
        per_layer = (saved.by_layer[-1] - earlier - outside) | last  # what one more layer adds
        return saved.bytes(saved.saved) + extra * saved.bytes(per_layer)
    inputs = set().union(*saved.inputs)
    # what one more layer adds: its hidden states (the shared rotary tables and mask are inputs once) and
    # its deferred losses' tensors
    per_layer = (set(saved.inputs[-1]) - set().union(*saved.inputs[:-1])) | last
    kept = outside | inputs
    recomputed = max(saved.bytes(keys - kept) for keys in saved.by_layer)
    return saved.bytes(kept) + extra * saved.bytes(per_layer) + recomputed


def training_inputs(config, batch: int, length: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """A padded training batch as ``qmoe.data.PadCollator`` gives it: the attention mask is passed already
    expanded to [batch, 1, length, length] (what transformers builds from a padded 2-D mask; its padding
    check reads values, which meta tensors have none of): the bool mask of sdpa, the additive one of eager."""
    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    if getattr(config, "_attn_implementation", None) == "eager":
        mask = torch.zeros(batch, 1, length, length, dtype=dtype, device=device)
    else:
        mask = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def training_forward(
    model: nn.Module, inputs: dict[str, torch.Tensor], before_aux: Callable[[], None] | None = None
) -> torch.Tensor:
    """The loss a training step differentiates (``qmoe.trainer.QmoeTrainer.compute_loss``)."""
    from ..attach import aux_loss, clear_aux

    clear_aux(model)
    out = model(**inputs)
    if before_aux is not None:
        before_aux()
    loss = out.loss + aux_loss(model)
    clear_aux(model)
    return loss


def contrastive_state(model: nn.Module) -> int:
    from ..attach import adapter_layers

    return sum(
        layer.contrastive_state_bytes()
        for layer in adapter_layers(model).values()
        if hasattr(layer, "contrastive_state_bytes")
    )


@dataclass
class Activations:
    """Bytes kept for backward at the peak of a training step (under the checkpointing mode asked for and
    without checkpointing), and the MoELoRA contrastive queues kept between steps."""

    saved: int
    saved_without_checkpointing: int
    contrastive_state: int


class ActivationMeter:
    """Measures activations of one (model config, adapter, dtype) at any batch and length; the meta model is
    built once."""

    def __init__(
        self,
        config,
        adapter,
        dtype: torch.dtype,
        device: str = "cpu",
        adapter_dtype: torch.dtype | None = None,
        attn_implementation: str = "auto",
    ):
        self.config, self.adapter, self.dtype, self.device = config, adapter, dtype, device
        self.layers_total = config.num_hidden_layers
        depth = MEASURED_LAYERS if homogeneous(config) else None
        model = meta_model(config, dtype, depth, attn_implementation)
        self.model = attach_meta(model, adapter, adapter_dtype).train()
        self.measured = len(decoder_layers(self.model))
        self._cache: dict[tuple[int, int, bool], Activations] = {}
        # the UI plans from several threads at once; the meta model's per-layer auxiliary-loss slots are
        # shared state, so one measurement at a time
        self._lock = threading.Lock()

    def measure(self, batch: int, length: int, checkpointing: bool) -> Activations:
        key = (batch, length, checkpointing)
        with self._lock:
            if key not in self._cache:
                inputs = training_inputs(self.model.config, batch, length, self.dtype, "meta")
                with fused_attention(self.device):
                    if self.adapter.method == "moelora":  # a first forward fills the contrastive queues (steady state)
                        training_forward(self.model, inputs)
                    saved = record_saved(self.model, inputs)
                state = contrastive_state(self.model)
                per_layer = state / self.measured
                for on in (False, True):
                    self._cache[(batch, length, on)] = Activations(
                        combine(saved, self.layers_total, on),
                        combine(saved, self.layers_total, False),
                        round(per_layer * self.layers_total),
                    )
            return self._cache[key]
