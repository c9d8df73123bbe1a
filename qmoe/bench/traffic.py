"""Weight bytes one decode step reads: what bounds batch-1 generation where the weights stream from memory.

At one token per forward every weight is read once and used for one multiply-add, so a decode step's time
follows its bytes more than its arithmetic. An unmerged adapter's decode cost, against the base with the same
kernels, is then bounded by ``frozen / (frozen + adapter)``: ``benchmarks/decode_cost.py`` prints this bound
beside the measured ratio. Counted: every linear layer's weight (a 4-bit layer's packed bytes and its
quantisation statistics), bias and norm weights, each storage once (a tied LM head and input embedding are one
tensor, read whole by the head); not counted: an untied input embedding (one row per token), the KV cache and
activations (the same for a base and its adapters).
"""

from __future__ import annotations

import torch
from torch import nn


def _quant_state_tensors(weight: torch.Tensor) -> list[torch.Tensor]:
    """bitsandbytes' quantisation statistics of a 4-bit weight (absmax, and the nested state's when double
    quantised); the code books are 16 values and not counted."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return []
    found = [state.absmax]
    nested = getattr(state, "state2", None)
    if nested is not None:
        found.append(nested.absmax)
    return [t for t in found if isinstance(t, torch.Tensor)]


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of the frozen model's weights one decode step reads (module docstring): linear layers (4-bit ones as
    stored), their biases, and every other module's own parameters but an untied input embedding's."""
    from ..attach import adapter_layers

    adapter_params = {
        id(getattr(layer, name)) for layer in adapter_layers(model).values() for name in layer.adapter_param_names
    }
    heads = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = [p for p in module.parameters(recurse=False) if id(p) not in adapter_params]
        if isinstance(module, nn.Embedding) and id(module.weight) not in heads:
            tensors = []  # an untied embedding: one row per token
        if isinstance(module, nn.Linear):
            tensors += _quant_state_tensors(module.weight)
        for t in tensors:
            key = t.data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def adapter_bytes(model: nn.Module) -> int:
    """Bytes of adapter weights one decode step reads in qmoe's fast path: each adapted layer's fused weights
    (``fused_weights``: up and down), of which MoELoRA reads its router and its k chosen experts' rows only."""
    from ..attach import adapter_layers

    total = 0
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            up, down = layer.fused_weights()
            method, n, r, k = layer.decoder_spec()
            size = up.element_size()
            if method == "moelora":  # up = [router (n rows); experts (n x r rows)], down = [out, n x r]
                total += size * (n * layer.in_features + k * r * (layer.in_features + layer.out_features))
            else:
                total += size * (up.numel() + down.numel())
    return total


def memory_bound_ratio(frozen: int, adapter: int) -> float:
    """The decode ratio to the base an adapter would reach if a step's time were its bytes' (module docstring)."""
    return frozen / (frozen + adapter)
