"""Tokenisation of a generated Alpaca set: the first run (json -> arrow, chat template, tokenizer, written to
$QMOE_CACHE/data) against a cached run (the same recipe again: nothing re-tokenised), with the pre-datasets
list path (every run re-tokenised in one process) as the baseline, all measured in the same run, interleaved.

Each measurement runs in a fresh interpreter (what a new ``qmoe finetune`` or ``--resume`` sees) and times only
the data preparation, wall and CPU (the process plus its tokenising workers).

    .venv/bin/python benchmarks/data_tokenise.py                      # 100k examples, 2 rounds
    .venv/bin/python benchmarks/data_tokenise.py --examples 20000 --rounds 1 --num-proc 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "builtin:smollm2-135m-instruct"
WORDS = "apples pears the a farmer sells buys each day how many more than twice half total costs dollars".split()


def write_alpaca(path: Path, n: int, seed: int = 0) -> None:
    """Alpaca records shaped like the real sets: a one-sentence instruction, optional input, a short answer."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40)))
            record = {
                "instruction": f"Problem {i}: {words}?",
                "input": "" if i % 3 else f"Use {rng.randint(2, 99)} and {rng.randint(2, 99)}.",
                "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) + f". Answer: {i % 97}.",
            }
            f.write(json.dumps(record) + "\n")


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the datasets.map worker processes
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def list_path(tokenizer, file: Path, max_length: int) -> list[dict]:
    """qmoe's data path before issue 16, verbatim: records read into lists, one chat-template render and two
    tokenizer calls per example, in one process, on every run (nothing cached)."""
    from qmoe.data import chat_prompt, read_records

    out = []
    for r in read_records(file):
        prompt = f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]
        prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(r["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
        if any(label != -100 for label in labels):
            out.append({"input_ids": (prompt_ids + answer_ids)[:max_length], "labels": labels})
    return out


def worker(args: argparse.Namespace) -> None:
    from qmoe.dataprep import prepare_training_data
    from qmoe.models import load_tokenizer, resolve_source
    from qmoe.recipe import DataSection

    tokenizer = load_tokenizer(resolve_source(MODEL))
    data = DataSection(source=args.file, format="alpaca", max_length=512, num_proc=args.num_proc)
    wall, cpu = time.perf_counter(), _cpu()
    if args.kind == "list":
        n, cached = len(list_path(tokenizer, Path(args.file), 512)), False
    else:
        prepared = prepare_training_data(data, tokenizer)
        n, cached = len(prepared.dataset), prepared.report.cached
    print(json.dumps({"wall": time.perf_counter() - wall, "cpu": _cpu() - cpu, "examples": n, "cached": cached}))


def measure(kind: str, file: Path, cache: Path, num_proc: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--file", str(file)]
    if num_proc:
        cmd += ["--num-proc", str(num_proc)]
    env = {**os.environ, "QMOE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: qmoe's automatic)")
    parser.add_argument("--worker", choices=["list", "first", "cached"], dest="kind", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if args.kind:
        return worker(args)

    from qmoe.models import cache_dir, resolve_source

    resolve_source(MODEL)  # converts the builtin model once, outside the timings
    work = Path(tempfile.mkdtemp(prefix="qmoe-tokenise-"))
    try:
        file = work / "alpaca.jsonl"
        write_alpaca(file, args.examples)
        results: dict[str, list[dict]] = {"list": [], "first": [], "cached": []}
        for _ in range(args.rounds):  # interleaved: each round measures all three under the same load
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            # the converted builtin model is shared (a link), so only the data start cold
            for item in Path(cache_dir()).iterdir():
                if item.name != "data":
                    (cache / item.name).symlink_to(item)
            results["list"].append(measure("list", file, cache, args.num_proc))
            results["first"].append(measure("first", file, cache, args.num_proc))
            results["cached"].append(measure("cached", file, cache, args.num_proc))
            assert results["cached"][-1]["cached"] and not results["first"][-1]["cached"]
        summary = {
            kind: {
                "wall_s": statistics.median(r["wall"] for r in runs),
                "cpu_s": statistics.median(r["cpu"] for r in runs),
                "examples": runs[0]["examples"],
            }
            for kind, runs in results.items()
        }
        base = summary["list"]["wall_s"]
        print(f"{args.examples} Alpaca examples, max_length 512, {os.cpu_count()} CPUs, median of {args.rounds} rounds")
        print(f"{'run':<28}{'wall s':>10}{'CPU s':>10}{'x list':>10}")
        names = {
            "list": "list path (before; each run)",
            "first": "datasets, first run",
            "cached": "datasets, cached",
        }
        for kind, row in summary.items():
            ratio = row["wall_s"] / base
            print(f"{names[kind]:<28}{row['wall_s']:>10.2f}{row['cpu_s']:>10.2f}{ratio:>10.3f}")
        if args.out:
            Path(args.out).write_text(
                json.dumps({"examples": args.examples, "summary": summary, "runs": results}, indent=2)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
