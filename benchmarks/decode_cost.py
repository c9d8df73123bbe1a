"""What an unmerged adapter costs at batch-1 decode, split into a fixed part and a part that grows with its
weights: qmoe's LoRA at ranks 1 to 32 and the three mixtures at their defaults, against the base model and the
wrapper floor, on the builtin SmolLM2-135M NF4 (issue 18: why the ratios stay below 1 on a CPU).

    python benchmarks/decode_cost.py [--ranks 1 4 8 16 32] [--methods moelora loracoe loramoe] [--repeats 5]
                                     [--json FILE]

A rank-1 LoRA moves almost no adapter weights, so its ratio to the base with the same direct calls of
bitsandbytes' CPU kernel (``base-direct``: qmoe chat's base) is the fixed per-layer cost (a module call, the
kernel call, the bookkeeping); each rank beyond adds a row of A and one of B per adapted projection, read every
token from memory. Beside each measured ratio, the ratio a step would have if its time were its weights' bytes
(``qmoe.bench.traffic``: frozen / (frozen + adapter) bytes read per token). Timed interleaved in one process with
``qmoe.bench.generate``'s loop (greedy, KV cache, one thread); ratios = base time / model time within each
round, the median over rounds and the lowest and highest round; CPU time beside wall.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--methods", nargs="*", default=["moelora", "loracoe", "loramoe"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from qmoe import AdapterConfig, attach
    from qmoe.bench import machine_info
    from qmoe.bench.adapters import method_config
    from qmoe.bench.backbones import share_frozen_clone
    from qmoe.bench.generate import (
        DIRECT,
        QUESTION,
        _decode_loop,
        _interleaved,
        _wrapped_only,
        paired_ratios,
        ratio_cell,
    )
    from qmoe.bench.traffic import adapter_bytes, frozen_bytes, memory_bound_ratio
    from qmoe.inference import call_4bit_directly
    from qmoe.models import load_base_model

    torch.set_num_threads(1)
    base, tokenizer, device = load_base_model("builtin:smollm2-135m-instruct", "nf4", "auto", "cpu")
    base.eval()
    messages = [{"role": "user", "content": QUESTION}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    models = {"base": base, "wrapper-floor": _wrapped_only(base).eval()}
    # the base with the direct calls of bitsandbytes' CPU kernel the adapter layers make (qmoe chat's base)
    if call_4bit_directly(direct := share_frozen_clone(base), device):
        models["base-direct"] = direct.eval()
    for r in args.ranks:
        models[f"lora r={r}"] = attach(share_frozen_clone(base), AdapterConfig(method="lora", r=r, dropout=0.0)).eval()
    for method in args.methods:  # (the generation benchmark's settings: each method's defaults)
        models[method] = attach(share_frozen_clone(base), method_config(method, dropout=0.0)).eval()
    runs = {name: (lambda m=model: _decode_loop(m, ids, args.new_tokens, device)) for name, model in models.items()}
    timed = _interleaved(runs, args.repeats, warmup=1)
    summary = paired_ratios(timed)
    frozen = frozen_bytes(base)  # (after the runs: bitsandbytes has packed its weights for its CPU kernel)
    read = {name: adapter_bytes(model) for name, model in models.items()}
    direct = paired_ratios(timed, reference="base-direct") if "base-direct" in timed else {}
    rows = [
        dict(
            model=name,
            decode_tokens_per_s=args.new_tokens / m["decode_s"],
            decode_ratio_to_base=m["decode_s_ratio"],
            decode_cpu_ratio_to_base=m["decode_cpu_s_ratio"],
            **m,
            **({f"{DIRECT}_ratio": direct[name]["decode_s_ratio"]} if direct else {}),
            **({f"{DIRECT}_ratio_range": direct[name]["decode_s_ratio_range"]} if direct else {}),
            adapter_bytes_per_token=read[name],
            memory_bound_ratio=memory_bound_ratio(frozen, read[name]),
        )
        for name, m in summary.items()
    ]
    print(f"frozen weights read per token: {frozen / 2**20:.1f} MiB")
    print(
        "| model | decode tok/s | × base (wall) | × base (CPU) | × base-direct (wall) | adapter MiB/token "
        "| bytes bound |\n|---|---|---|---|---|---|---|"
    )
    for row in rows:
        print(
            f"| {row['model']} | {row['decode_tokens_per_s']:.1f} | {ratio_cell(row, 'decode_s')} "
            f"| {ratio_cell(row, 'decode_cpu_s')} | {ratio_cell(row, DIRECT) if direct else '–'} "
            f"| {row['adapter_bytes_per_token'] / 2**20:.1f} | {row['memory_bound_ratio']:.2f} |"
        )
    if args.json:
        meta = dict(
            machine_info(device),
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            threads=1,
            frozen_bytes_per_token=frozen,
        )
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
