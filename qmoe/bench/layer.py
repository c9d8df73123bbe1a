"""Layer level: forward + backward of one adapted Linear4bit of a real shape.

Per method, interleaved on the same frozen NF4 weights and the same input:
- the qmoe layer (base + adapter, training mode so MoELoRA's auxiliary losses are computed and
  back-propagated) vs PEFT's LoRA Linear4bit at the same trainable-parameter count;
- the adapter alone (eval mode: no auxiliary losses) vs the per-expert-loop reference of its method;
- each non-default kernel backend of the device vs the default one.
Dropout is 0 everywhere here, so the loop references (which have none) compute the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import kernels
from ..tuners import layer_class
from ..tuners.base import AdapterContext
from ..tuners.lora.reference import lora_reference
from ..tuners.loracoe.reference import loracoe_reference
from ..tuners.loramoe.reference import loramoe_reference
from ..tuners.moelora.reference import moelora_reference
from .adapters import PEFT, matching_rank, method_config, peft_layer, trainable
from .backbones import random_linear4bit
from .timing import interleaved_medians

REFERENCES = {
    "moelora": moelora_reference,
    "loracoe": loracoe_reference,
    "loramoe": loramoe_reference,
    "lora": lora_reference,
}
LOOP = "per-expert-loop"


def alternative_backends(method: str, device: str) -> list[str]:
    if method not in ("moelora", "loracoe"):
        return []
    alternatives = ["function"]
    if device == "cuda" and kernels.triton_available():
        alternatives.insert(0, "triton")
    return alternatives


def _fwd_bwd(fn, x, grad_out, params):
    def run():
        out, extra = fn(x)
        loss = (out * grad_out).sum() + extra
        loss.backward()
        for p in params:
            p.grad = None
        x.grad = None

    return run


def bench_layer(
    name: str,
    in_features: int,
    out_features: int,
    tokens: int,
    methods: list[str],
    device: str,
    repeats: int,
    warmup: int,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Records (dicts) for one layer shape."""
    base = random_linear4bit(in_features, out_features, device)
    dtype = base.compute_dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_features, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(tokens, out_features, generator=g).to(device=device, dtype=dtype)
    records = []
    for method in methods:
        if progress:
            progress(f"layer {name} {in_features}->{out_features} x {tokens} tokens: {method}")
        config = method_config(method, dropout=0.0)  # method: a bench label such as "moelora-nocl"
        torch.manual_seed(0)
        layer = layer_class(config.method)(base, config, AdapterContext()).to(device)
        with torch.no_grad():  # B starts at zero; non-zero B gives realistic gradients through the router
            layer.lora_B.normal_(0, 0.02)
        ours = [p for p in layer.parameters() if p.requires_grad]
        rank = matching_rank(trainable(layer), in_features + out_features)
        peft = peft_layer(base, rank, 0.0).to(device)
        peft_params = [p for p in peft.parameters() if p.requires_grad]
        reference = REFERENCES[config.method]

        def full(inp, layer=layer):
            layer.train()
            out = layer(inp)
            return out, sum(layer.aux_losses().values()) if layer.aux else 0.0

        def adapter(inp, layer=layer):
            layer.eval()
            return layer.delta(inp, None), 0.0

        def loop(inp, layer=layer, reference=reference):
            return reference(layer, inp), 0.0

        def with_backend(fn, backend):
            def run(inp):
                kernels.set_backend(backend)
                try:
                    return fn(inp)
                finally:
                    kernels.set_backend(None)

            return run

        default_backend = kernels.backend_for(x)
        candidates = {
            method: _fwd_bwd(full, x, grad_out, ours),
            PEFT: _fwd_bwd(lambda inp, peft=peft: (peft(inp), 0.0), x, grad_out, peft_params),
            "adapter": _fwd_bwd(adapter, x, grad_out, ours),
            LOOP: _fwd_bwd(loop, x, grad_out, ours),
        }
        alternatives = [b for b in alternative_backends(config.method, device) if b != default_backend]
        for backend in alternatives:
            candidates[f"{method}[{backend}]"] = _fwd_bwd(with_backend(full, backend), x, grad_out, ours)
        medians = interleaved_medians(candidates, repeats, warmup, device)
        shapes = {"layer": name, "in_features": in_features, "out_features": out_features, "tokens": tokens}
        common = dict(
            level="layer", device=device, dtype=str(dtype).replace("torch.", ""), shapes=shapes, repeats=repeats
        )
        records.append(
            _record(
                common,
                method,
                default_backend,
                PEFT,
                medians[method],
                medians[PEFT],
                trainable_params=trainable(layer),
                baseline_trainable_params=trainable(peft),
                baseline_rank=rank,
            )
        )
        records.append(
            _record(
                dict(common, level="adapter"),
                method,
                default_backend,
                LOOP,
                medians["adapter"],
                medians[LOOP],
                trainable_params=trainable(layer),
                baseline_trainable_params=trainable(layer),
            )
        )
        for backend in alternatives:
            records.append(
                _record(
                    common,
                    method,
                    backend,
                    f"{method}[{default_backend}]",
                    medians[f"{method}[{backend}]"],
                    medians[method],
                    trainable_params=trainable(layer),
                    baseline_trainable_params=trainable(layer),
                )
            )
    return records


def _record(common, method, backend, baseline, ours, theirs, **extra):
    return dict(
        common,
        method=method,
        backend=backend,
        baseline=baseline,
        time_s=ours["median_s"],
        baseline_time_s=theirs["median_s"],
        ratio_time=ours["median_s"] / theirs["median_s"],
        ratio_cpu_time=ours["cpu_median_s"] / theirs["cpu_median_s"],
        peak_mem=None,
        baseline_peak_mem=None,
        ratio_peak_mem=None,
        **extra,
    )
