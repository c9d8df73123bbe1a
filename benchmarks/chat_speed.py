"""Tokens/s of ``qmoe chat`` as a user gets them: ``qmoe.chat.stream_reply`` (64 new tokens, greedy, torch's
default threads) with the builtin SmolLM2-135M and a MoELoRA adapter at the quickstart recipe's settings, each
configuration in its own process (so each builds its own state as chat does), interleaved, medians of rounds.

    python benchmarks/chat_speed.py [--rounds 3] [--new-tokens 64] [--json FILE]

Configurations: the base model, and the adapter with everything chat does by default now; both over
bitsandbytes' forward instead of qmoe's direct calls of its CPU kernel (QMOE_DIRECT_4BIT=0); both with
``--compile`` (timed after two warm-up replies: the first compiles the decode step, the second, longer one
compiles it again for any cache length, as every chat's second reply does); the adapter with qmoe's CPU
kernels off (QMOE_KERNELS=torch); with two generation threads (QMOE_CHAT_THREADS=2, for the adapter and the
base); and as chat ran when issue 18 was filed (the training code path, QMOE_FAST_INFERENCE=0, and two
threads). The adapter's values are random but small, so every adapter configuration generates the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (environment, with the adapter, qmoe chat --compile)
CONFIGS = {
    "base": ({}, False, False),
    "moelora (default)": ({}, True, False),
    # without qmoe's direct calls of bitsandbytes' CPU kernel: the base as transformers and bitsandbytes run it
    "base, bitsandbytes' forward": ({"QMOE_DIRECT_4BIT": "0"}, False, False),
    "moelora, bitsandbytes' forward": ({"QMOE_DIRECT_4BIT": "0"}, True, False),
    "base, --compile": ({}, False, True),
    "moelora, --compile": ({}, True, True),
    "moelora, CPU kernels off": ({"QMOE_KERNELS": "torch"}, True, False),
    "moelora, 2 chat threads": ({"QMOE_CHAT_THREADS": "2"}, True, False),
    "base, 2 chat threads": ({"QMOE_CHAT_THREADS": "2"}, False, False),
    # how chat ran when issue 18 was filed: the training code path, torch's default threads (this machine's 2)
    "moelora, as filed": ({"QMOE_FAST_INFERENCE": "0", "QMOE_CHAT_THREADS": "2", "QMOE_DIRECT_4BIT": "0"}, True, False),
}
PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?"


def make_adapter(folder: Path) -> None:
    """A MoELoRA adapter (quickstart settings) on the builtin model with random values in every tensor (small
    ones in B: the model stays fluent, and float rounding between code paths cannot change a greedy token)."""
    import torch

    import qmoe
    from qmoe.models import load_base_model
    from qmoe.recipe import load_recipe
    from qmoe.serialization import save_adapter

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")
    model, _, _ = load_base_model("builtin:smollm2-135m-instruct", "nf4", "auto", "cpu")
    model = qmoe.attach(model, recipe.adapter)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in qmoe.adapter_layers(model).values():
            for name in layer.adapter_param_names:
                p = getattr(layer, name)
                std = 1e-3 if name == "lora_B" else float(p.float().std().clamp(min=0.02))
                p.copy_(torch.randn(p.shape, generator=g) * std)
    save_adapter(model, folder)


def one_reply(adapter: str | None, new_tokens: int, compile: bool) -> dict:
    from qmoe.chat import load_chat_model, stream_reply

    chat = load_chat_model(adapter, compile=compile)
    messages = [{"role": "user", "content": PROMPT}]
    list(stream_reply(chat, messages, max_new_tokens=4))  # warm-up (fused weights, kernels loaded, compiled)
    if compile:
        # a second, longer reply grows the static cache and compiles the step once more, for any cache length
        # (what every later reply of a chat runs); the timed reply then fits in that cache
        compile_wall = time.perf_counter()
        list(stream_reply(chat, messages, max_new_tokens=new_tokens + 8))
        compile_wall = time.perf_counter() - compile_wall
    wall, cpu = time.perf_counter(), time.process_time()
    done = [e for e in stream_reply(chat, messages, max_new_tokens=new_tokens) if e.get("done")][0]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {"tokens": len(done["tokens"]), "wall_s": wall, "cpu_s": cpu, "text": done["text"]}
    if compile:  # (the second warm-up reply's wall time, its recompilation included; compiled one-token steps)
        result.update(warmup_compile_s=compile_wall, compiled_steps=chat.model.forward.compiled_steps)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("ADAPTER", "NEW_TOKENS", "COMPILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        adapter, tokens, compile = args.child
        print(json.dumps(one_reply(None if adapter == "-" else adapter, int(tokens), compile == "1")))
        return 0
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        make_adapter(Path(tmp) / "adapter")
        for i in range(args.rounds):
            names = list(CONFIGS)[i % len(CONFIGS) :] + list(CONFIGS)[: i % len(CONFIGS)]
            for name in names:
                env, with_adapter, compile = CONFIGS[name]
                adapter = str(Path(tmp) / "adapter") if with_adapter else "-"
                cmd = [sys.executable, __file__, "--child", adapter, str(args.new_tokens), "1" if compile else "0"]
                out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                last = runs[name][-1]
                print(f"round {i + 1}/{args.rounds} {name}: {last['tokens'] / last['wall_s']:.1f} tok/s", flush=True)
    rows = []
    for name, rs in runs.items():
        tps = statistics.median(r["tokens"] / r["wall_s"] for r in rs)
        cpu_tps = statistics.median(r["tokens"] / r["cpu_s"] for r in rs)
        rows.append({"config": name, "tokens_per_s": tps, "tokens_per_cpu_s": cpu_tps, "runs": rs})
    base = rows[0]["tokens_per_s"]
    old = rows[-1]["tokens_per_s"]
    print("\n| configuration | tokens/s (wall) | tokens per CPU-second | × base | × as filed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['tokens_per_cpu_s']:.1f} | {r['tokens_per_s'] / base:.2f} "
            f"| {r['tokens_per_s'] / old:.2f} |"
        )
    same = len({r["runs"][0]["text"] for r in rows if CONFIGS[r["config"]][1]}) == 1
    print(f"\nthe adapter configurations generated {'the same' if same else 'DIFFERENT'} text")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
