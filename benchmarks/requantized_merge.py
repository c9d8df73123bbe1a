"""Why ``qmoe merge`` / ``qmoe chat --merge`` keep merged layers dense: how much of a trained LoRA's update survives
if W + s·B·A is re-quantised to the backbone's 4-bit format (what a "merged 4-bit model" would hold).

    python benchmarks/requantized_merge.py ADAPTER [--json FILE]

ADAPTER: a trained lora run directory or adapter folder (e.g. one of ``benchmarks/round2.py``'s runs). For every
adapted layer, with W the dequantised 4-bit weight and D = s·B·A the adapter's update, R = dequant(quant(W + D)) in
the layer's own NF4 settings (block size, double quantisation):

- ``captured``: <R - W, D> / <D, D>, the share of the update the re-quantised weight still applies (1 = all of it);
- ``error``: |R - (W + D)| / |D|, what re-quantisation changes, relative to the update (0 = nothing).

Then on the model (the GSM8K question of ``qmoe bench --generate`` plus a worked answer, one forward): how far the
re-quantised model's logits are from the dense merge's, relative to how far the base's are, and how often its
next-token choice agrees with the dense merge's, beside the base's agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="a trained lora run directory or adapter folder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from torch import nn

    from qmoe import adapter_config, adapter_layers
    from qmoe.bench.generate import QUESTION
    from qmoe.chat import load_chat_model
    from qmoe.inference import dequantized_linear

    chat = load_chat_model(args.adapter, dequantize="off", device="cpu")
    import bitsandbytes.functional as bnbf  # (after qmoe, which quiets bitsandbytes' hub-kernel notice)

    model, tokenizer = chat.model, chat.tokenizer
    config = adapter_config(model)
    if config is None or config.method != "lora":
        print(f"{args.adapter} is not a lora adapter (only a LoRA has one merged weight)", file=sys.stderr)
        return 2
    answer = "In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. The answer is 72."
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]
    ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]

    per_kind: dict[str, list[tuple[float, float, float]]] = {}
    weights = {}  # layer name -> (W, W + D, R)
    with torch.no_grad():
        for name, layer in adapter_layers(model).items():
            w = dequantized_linear(layer.base_layer, torch.float32).weight
            d = (layer.lora_B.float() @ layer.lora_A.float()) * layer.scale
            state = layer.base_layer.weight.quant_state
            packed, new_state = bnbf.quantize_4bit(
                w + d, blocksize=state.blocksize, quant_type=state.quant_type, compress_statistics=state.nested
            )
            r = bnbf.dequantize_4bit(packed, new_state).float()
            norm = d.pow(2).sum()
            captured = float(((r - w) * d).sum() / norm)
            error = float((r - (w + d)).norm() / norm.sqrt())
            per_kind.setdefault(name.rsplit(".", 1)[-1], []).append((captured, error, float(d.norm() / w.norm())))
            weights[name] = (w, w + d, r)

        def logits_with(which: int) -> torch.Tensor:
            """The model's logits with every adapted layer replaced by a dense layer of weights[...][which]."""
            swapped = []
            for name, layer in adapter_layers(model).items():
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                dense = nn.Linear(layer.in_features, layer.out_features, bias=False)
                dense.weight = nn.Parameter(weights[name][which], requires_grad=False)
                dense.bias = layer.base_layer.bias
                swapped.append((parent, child, layer))
                setattr(parent, child, dense)
            try:
                return model(input_ids=ids).logits[0].float()
            finally:
                for parent, child, layer in swapped:
                    setattr(parent, child, layer)

        base, merged, requantized = (logits_with(i) for i in range(3))

    def mean(values):
        return sum(values) / len(values)

    rows = [
        dict(
            kind=kind,
            layers=len(v),
            captured=mean([c for c, _, _ in v]),
            error=mean([e for _, e, _ in v]),
            update_to_weight=mean([u for _, _, u in v]),
        )
        for kind, v in per_kind.items()
    ]
    everything = [x for v in per_kind.values() for x in v]
    rows.append(
        dict(
            kind="all",
            layers=len(everything),
            captured=mean([c for c, _, _ in everything]),
            error=mean([e for _, e, _ in everything]),
            update_to_weight=mean([u for _, _, u in everything]),
        )
    )
    model_level = dict(
        tokens=int(ids.shape[1]),
        logits_distance_requantized=float((requantized - merged).norm() / (base - merged).norm()),
        next_token_agreement_requantized=float((requantized.argmax(-1) == merged.argmax(-1)).float().mean()),
        next_token_agreement_base=float((base.argmax(-1) == merged.argmax(-1)).float().mean()),
    )
    print("| layer | count | update kept (captured) | re-quantisation error / update | update / weight |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['kind']} | {row['layers']} | {row['captured']:.3f} | {row['error']:.2f} "
            f"| {row['update_to_weight']:.4f} |"
        )
    print(
        f"\nlogits over {model_level['tokens']} tokens: |requantised - dense merge| / |base - dense merge| = "
        f"{model_level['logits_distance_requantized']:.2f}; next token agrees with the dense merge: requantised "
        f"{model_level['next_token_agreement_requantized']:.1%}, base {model_level['next_token_agreement_base']:.1%}"
    )
    if args.json:
        args.json.write_text(json.dumps({"adapter": str(args.adapter), "rows": rows, "model": model_level}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
