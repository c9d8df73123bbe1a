"""Routing telemetry: per-layer expert load of the last forward, and per-token traces for inference."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .attach import adapter_config, adapter_context, adapter_layers


def routing(model: nn.Module) -> dict[str, dict]:
    """Per routed layer: ``counts`` (tokens per expert in the last forward, padding excluded), ``load``
    (fractions summing to 1), ``tokens``, and ``trace`` (list of per-forward dense weight tensors
    [tokens, experts] while tracing is on). For LoRACoE the "experts" are the r ranks and ``load`` is the
    mean rank-composition weight. Empty for plain LoRA."""
    config = adapter_config(model)
    out = {}
    for name, layer in adapter_layers(model).items():
        if not layer.routed or layer.last_load is None:
            continue
        out[name] = {
            "method": config.method,
            "counts": None if layer.last_counts is None else layer.last_counts.cpu().tolist(),
            "load": layer.last_load.float().cpu().tolist(),
            "tokens": int(layer.last_tokens),
            "trace": [rec["weights"].float().cpu() for rec in layer.trace_records],
        }
    return out


def expert_load(model: nn.Module) -> dict[str, list[float]]:
    """{layer name: load fractions} of the last forward, the shape metrics.jsonl records."""
    return {name: info["load"] for name, info in routing(model).items()}


def set_tracing(model: nn.Module, enabled: bool) -> None:
    """Switch per-token routing traces on/off (recorded in no-grad forwards only); clears old traces."""
    adapter_context(model).trace = enabled
    for layer in adapter_layers(model).values():
        layer.trace_records = []


@contextmanager
def trace_routing(model: nn.Module) -> Iterator[nn.Module]:
    """``with qmoe.trace_routing(model): model.generate(...)`` then read ``qmoe.routing(model)[..]['trace']``."""
    set_tracing(model, True)
    try:
        yield model
    finally:
        adapter_context(model).trace = False


def token_routing(model: nn.Module, layer: str, top: int = 2) -> list[list[tuple[int, float]]]:
    """Per token (concatenated over traced forwards, batch size 1), the ``top`` (expert, weight) pairs at
    ``layer``: the routing each generated token actually took."""
    traces = routing(model)[layer]["trace"]
    return top_experts(torch.cat(traces), top) if traces else []


def top_experts(weights: torch.Tensor, top: int = 2) -> list[list[tuple[int, float]]]:
    """Per row of dense routing weights [tokens, experts], the ``top`` (expert, weight) pairs, heaviest first."""
    values, ids = weights.topk(min(top, weights.shape[-1]), dim=-1)
    return [
        [(int(i), float(v)) for i, v in zip(r_ids, r_vals, strict=True)]
        for r_ids, r_vals in zip(ids, values, strict=True)
    ]
