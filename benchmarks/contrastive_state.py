"""MoELoRA's contrastive-loss memory per decoder layer at a real model's shapes, from the real layer objects.

Builds one decoder layer's seven adapted projections (q, k, v, o, gate, up, down) as MoELoRA layers around
full-size ``nn.Linear`` bases (default: Llama-2-7B, hidden 4096, MLP 11008, bf16, the method's defaults),
runs training forwards on random tokens until every queue is full, and reports per decoder layer:

- the contrastive state kept between steps (the queues, and the snapshot of them the last forward used);
- the bytes autograd saves for backward during the forward because of the contrastive loss (the forward
  with the loss minus the forward without it, unique storages, via ``torch.autograd.graph.saved_tensors_hooks``).

Runs against whichever qmoe is importable, so the same command measures an older checkout too
(``PYTHONPATH=/path/to/old/checkout python benchmarks/contrastive_state.py``).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import qmoe
from qmoe.tuners.base import AdapterContext
from qmoe.tuners.moelora.layer import MoELoraLayer

SHAPES = {  # name: (hidden, MLP width, key/value width) of the published configs
    "llama-2-7b": (4096, 11008, 4096),
    "llama-2-13b": (5120, 13824, 5120),
    "smollm2-135m": (576, 1536, 192),
}


def projections(hidden: int, mlp: int, kv: int) -> dict[str, tuple[int, int]]:
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, mlp),
        "up_proj": (hidden, mlp),
        "down_proj": (mlp, hidden),
    }


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.device.type != "meta":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def training_forward(layer: nn.Module, x: torch.Tensor) -> None:
    """The layer's forward and its auxiliary losses, computed as training computes them (older qmoe versions
    computed them inside the forward and have no ``aux_losses``)."""
    layer(x)
    getattr(layer, "aux_losses", dict)()


def queue_bytes(layer: nn.Module) -> int:
    """Bytes of the contrastive state kept between steps: the queues and the snapshot of them that the
    last forward used (kept for gradient checkpointing's replay; after an enqueue it is a second copy).
    The layer's own count (what ``qmoe plan`` uses) where it has one; older versions are counted here."""
    if hasattr(layer, "contrastive_state_bytes"):
        return layer.contrastive_state_bytes()
    seen = {}
    tensors = [value for name, value in vars(layer).items() if name.startswith("queue")]
    tensors += list(getattr(layer, "_queue_used", None) or ())
    for value in tensors:
        if isinstance(value, torch.Tensor):
            seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(seen.values())


def measure(hidden: int, mlp: int, kv: int, dtype: torch.dtype, tokens: int, steps: int) -> dict:
    torch.manual_seed(0)
    config = qmoe.AdapterConfig(method="moelora", dropout=0.0)
    context = AdapterContext()
    rows = {}
    for name, (fan_in, fan_out) in projections(hidden, mlp, kv).items():
        base = nn.Linear(fan_in, fan_out, bias=False, dtype=dtype).requires_grad_(False)
        layer = MoELoraLayer(base, config, context).train()
        with torch.no_grad():  # B starts at zero: give the experts outputs to contrast
            layer.lora_B.normal_(0, 0.02)
        x = torch.randn(tokens, fan_in, dtype=dtype)
        for _ in range(steps):
            training_forward(layer, x)
        with_loss = saved_bytes(lambda layer=layer, x=x: training_forward(layer, x))
        layer.config = config.model_copy(update={"contrastive_loss_weight": 0.0})
        without_loss = saved_bytes(lambda layer=layer, x=x: training_forward(layer, x))
        layer.config = config
        rows[name] = {
            "queue_bytes": queue_bytes(layer),
            "queue_entries": int(layer.queue_labels.shape[0]),
            "saved_for_backward_by_loss": with_loss - without_loss,
        }
    total = {key: sum(row[key] for row in rows.values()) for key in ("queue_bytes", "saved_for_backward_by_loss")}
    return {"per_projection": rows, "per_decoder_layer": total, "qmoe": qmoe.__file__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama-2-7b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per forward (>= contrastive_samples)")
    parser.add_argument("--steps", type=int, default=6, help="forwards before measuring (queues fill in ~4)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    hidden, mlp, kv = SHAPES[args.model]
    result = measure(hidden, mlp, kv, getattr(torch, args.dtype), args.tokens, args.steps)
    result.update(model=args.model, dtype=args.dtype)
    total = result["per_decoder_layer"]
    print(f"{args.model} ({args.dtype}), one decoder layer, MoELoRA defaults; qmoe from {result['qmoe']}")
    print("| projection | queue entries | queue state | saved for backward by the loss |\n|---|---|---|---|")
    for name, row in result["per_projection"].items():
        print(
            f"| {name} | {row['queue_entries']} | {row['queue_bytes'] / 1024:.1f} KiB "
            f"| {row['saved_for_backward_by_loss'] / 1024:.1f} KiB |"
        )
    print(
        f"| **decoder layer** | | **{total['queue_bytes'] / 1024:.1f} KiB** "
        f"| **{total['saved_for_backward_by_loss'] / 1024:.1f} KiB** |"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
