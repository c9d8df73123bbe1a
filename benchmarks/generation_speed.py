"""Tokens/s of chat generation: the 4-bit base model alone vs the same model with each method's adapter freshly
attached (paper-default configuration), greedy, batch 1, a fixed number of new tokens.

    python benchmarks/generation_speed.py --device cuda --json gen.json --markdown gen.md
    python benchmarks/generation_speed.py --device cpu --new-tokens 8 --repeats 1     # a quick look on CPU

Every adapted model is a structural copy of the one loaded base sharing its frozen weights (as ``qmoe bench``
does), and all candidates are timed interleaved in this process, so the ratios to the base compare like with
like. A fresh adapter's B is zero: it generates exactly the base's tokens while paying for its routing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
BASE = "base"


def measure(source: str, device: str, methods: list[str], new_tokens: int, repeats: int, warmup: int) -> dict:
    from qmoe import attach, kernels
    from qmoe.bench import machine_info
    from qmoe.bench.adapters import method_config, trainable
    from qmoe.bench.backbones import share_frozen_clone
    from qmoe.bench.timing import interleaved_medians
    from qmoe.models import load_base_model

    base, tokenizer, device = load_base_model(source, "nf4", "auto", device)
    base.eval()
    base.config.use_cache = True
    for p in base.parameters():
        p.requires_grad_(False)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    models = {BASE: base}
    params = {BASE: 0}
    for method in methods:
        models[method] = attach(share_frozen_clone(base), method_config(method, dropout=0.0)).eval()
        params[method] = trainable(models[method])

    def generate(model):
        def run():
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,  # no early end of sequence: every candidate makes the same count
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens

        return run

    medians = interleaved_medians({name: generate(m) for name, m in models.items()}, repeats, warmup, device)
    used = kernels.backends_used()
    rows = []
    for name in models:
        seconds = medians[name]["median_s"]
        rows.append(
            dict(
                model=name,
                backend=used.get(method_config(name).method, "torch") if name != BASE else "-",
                trainable_params=params[name],
                seconds=seconds,
                tokens_per_s=new_tokens / seconds,
                ratio_to_base=seconds / medians[BASE]["median_s"],
            )
        )
    meta = dict(
        machine_info(device),
        source=source,
        dtype=str(next(p for p in base.parameters() if p.is_floating_point()).dtype).replace("torch.", ""),
        prompt_tokens=int(inputs["input_ids"].shape[1]),
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
        kernel_backends=used,
    )
    return {"meta": meta, "rows": rows}


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"Generation, {meta['source']} NF4 ({meta['dtype']} compute) on {meta['device_name']}: greedy, batch 1, "
        f"{meta['prompt_tokens']}-token prompt, {meta['new_tokens']} new tokens, median of {meta['repeats']}.",
        "",
        "| model | kernels | trainable params | tokens/s | × time vs base |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['trainable_params']:,} | {r['tokens_per_s']:.1f} "
            f"| {r['ratio_to_base']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from qmoe.bench.adapters import METHOD_SETTINGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="builtin:smollm2-135m-instruct", help="base model (a qmoe model.source)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--methods", nargs="+", default=["moelora", "loracoe", "loramoe", "lora"], choices=list(METHOD_SETTINGS)
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown to FILE")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("generation_speed.py: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    result = measure(args.source, args.device, args.methods, args.new_tokens, args.repeats, args.warmup)
    table = markdown(result)
    print(table, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
