"""The Python half of ``benchmarks/gpu_validation.sh``: the benchmark plan it runs, the check that the GPU tests
really ran, and the ``summary.md`` it ends with.

    python benchmarks/gpu_validation.py bench --device cuda --json B.json --markdown B.md [--methods ...]
    python benchmarks/gpu_validation.py bench --device cpu --tiny ...        # the dry run's sizes
    python benchmarks/gpu_validation.py tests-ran gpu-tests.xml              # exit 1 if a GPU test skipped
    python benchmarks/gpu_validation.py summary OUT [--dry-run]              # OUT/summary.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# the benchmark step names of gpu_validation.sh: with auto (Triton on CUDA) and with QMOE_KERNELS=torch
BENCH_RUNS = {"bench-triton": "auto (Triton kernels)", "bench-torch": "QMOE_KERNELS=torch"}


# ---- bench ------------------------------------------------------------------------------------------------


def tiny_plan(device: str):
    """The dry run's plan: every code path of the quick plan (layer, adapter-vs-loop, step, peak-memory child
    processes) at sizes that take seconds."""
    from qmoe.bench import ALL_METHODS, BenchPlan, LayerCase, StepCase
    from qmoe.bench.backbones import BUILTIN

    return BenchPlan(
        device,
        [LayerCase(BUILTIN, "q_proj", 576, 576, 64)],
        ALL_METHODS,
        [StepCase(BUILTIN, 1, 32, layers=1)],
        ["moelora", "loracoe"],
        layer_repeats=1,
        step_repeats=1,
        warmup=0,
        name="tiny (dry run)",
    )


def bench(args) -> int:
    import torch
    import transformers

    from qmoe.bench import plan_for, run_bench
    from qmoe.bench.report import markdown, write_json

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_validation.py bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 3
    if args.device == "cpu":
        torch.set_num_threads(1)  # as qmoe bench on CPU
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    plan = tiny_plan(args.device) if args.tiny else plan_for(args.device, quick=True)
    if args.methods:
        plan.layer_methods = [m for m in plan.layer_methods if m in args.methods]
        plan.step_methods = [m for m in plan.step_methods if m in args.methods]
    result = run_bench(plan, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    result["meta"]["command"] = "python benchmarks/gpu_validation.py " + " ".join(sys.argv[1:])
    write_json(result, args.json)
    Path(args.markdown).write_text(markdown(result))
    print(markdown(result))
    return 0


# ---- tests-ran ----------------------------------------------------------------------------------------------


def junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def tests_ran(args) -> int:
    counts = junit_counts(Path(args.junit))
    print(json.dumps(counts))
    if counts["tests"] == 0 or counts["skipped"]:
        print(
            f"gpu tests: {counts['skipped']} of {counts['tests']} skipped on a machine that should run them all "
            "(see the skip reasons in gpu-tests.log)",
            file=sys.stderr,
        )
        return 1
    return 0


# ---- summary --------------------------------------------------------------------------------------------


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    return out


def _steps(out: Path) -> list[tuple[str, str, int]]:
    rows = []
    for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").is_file() else []:
        name, status, seconds = line.split("\t")
        rows.append((name, status, int(seconds)))
    return rows


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f} MiB"


def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _machine(out: Path) -> list[str]:
    meta = (_json(out / "bench-triton.json") or _json(out / "bench-torch.json") or {}).get("meta") or {}
    doctor = _json(out / "doctor.json") or {}
    checks = {c["name"]: c for c in doctor.get("checks", [])}
    lines = []
    if meta:
        lines.append(f"- **Device:** {meta.get('device_name')} ({meta.get('device')}); CPU {meta.get('cpu')}")
        software = ", ".join(
            f"{name} {meta.get(name)}" for name in ("torch", "bitsandbytes", "triton", "transformers", "peft")
        )
        lines.append(f"- **Software:** Python {meta.get('python')}, {software}")
        lines.append(f"- **Date:** {meta.get('date')}")
    for name in ("cuda", "gpu 0"):
        if name in checks:
            lines.append(f"- **{name}:** {checks[name]['detail']}")
    return lines


def _bench_rows(out: Path) -> list[str]:
    lines = []
    for run, label in BENCH_RUNS.items():
        result = _json(out / f"{run}.json")
        if not result:
            continue
        for r in result["records"]:
            if r["level"] != "step":
                continue
            s = r["shapes"]
            lines.append(
                f"| {s['backbone']} {s['layers']}L b{s['batch']}×{s['seq']} | {r['method']} | {label}: {r['backend']} "
                f"| {_x(r['ratio_time'])} | {_x(r['ratio_peak_mem'])} | {_mib(r['peak_mem'])} "
                f"| {r['tokens_per_s']:,.0f} | {r['baseline_tokens_per_s']:,.0f} |"
            )
    if not lines:
        return []
    return [
        "### Training step vs PEFT LoRA at the same trainable-parameter count",
        "",
        "× time and × peak memory (`torch.cuda.max_memory_allocated` on CUDA, peak RSS on CPU) are method / PEFT "
        "LoRA; details in `bench-triton.md` and `bench-torch.md`.",
        "",
        "| step | method | kernels | × time | × peak memory | peak memory | tokens/s | PEFT tokens/s |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def _layer_kernel_rows(out: Path) -> list[str]:
    result = _json(out / "bench-triton.json")
    if not result:
        return []
    lines = []
    for r in result["records"]:
        if r["level"] == "layer" and "[" in r["baseline"]:  # a backend against the default one
            s = r["shapes"]
            lines.append(
                f"| {s['layer']} {s['in_features']}→{s['out_features']} ×{s['tokens']} | {r['method']} "
                f"| {r['backend']} vs {r['baseline']} | {_x(r['ratio_time'])} |"
            )
    if not lines:
        return []
    return [
        "### Layer forward + backward: each kernel backend against the default one",
        "",
        "| layer | method | backends | × time |",
        "|---|---|---|---|",
        *lines,
        "",
    ]


def _quickstart(out: Path) -> list[str]:
    run = out / "quickstart"
    status = _json(run / "status.json")
    if not status:
        return []
    metrics = _jsonl(run / "metrics.jsonl")
    evaluation = _json(run / "eval.json") or {}
    peaks = [m["peak_mem_mb"] for m in metrics if isinstance(m.get("peak_mem_mb"), (int, float))]
    speeds = [m["tokens_per_s"] for m in metrics if isinstance(m.get("tokens_per_s"), (int, float))]
    losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), (int, float))]
    seconds = next((s for name, _, s in _steps(out) if name == "quickstart"), None)
    accuracy = evaluation.get("accuracy")
    cells = [
        str(status.get("state")),
        str(status.get("step")),
        str(status.get("kernel_backend", "–")),
        f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "–",
        f"{statistics.median(speeds):,.0f}" if speeds else "–",
        f"{max(peaks):,.0f} MB" if peaks else "–",
        f"{accuracy:.3f} (n={evaluation.get('n')})" if accuracy is not None else "–",
        f"{seconds} s" if seconds is not None else "–",
    ]
    return [
        "### Quickstart end to end (`recipes/quickstart.yaml`, see the command in `quickstart.log`)",
        "",
        "| state | steps | kernels | loss first → last | tokens/s (median) | peak memory | eval accuracy | wall time |",
        "|---|---|---|---|---|---|---|---|",
        "| " + " | ".join(cells) + " |",
        "",
    ]


def _tests(out: Path) -> list[str]:
    path = out / "gpu-tests.xml"
    if not path.is_file():
        return []
    c = junit_counts(path)
    passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return [
        f"- **GPU tests (`pytest -m gpu`):** {passed} passed, {c['failures'] + c['errors']} failed, "
        f"{c['skipped']} skipped"
    ]


def _doctor(out: Path) -> list[str]:
    doctor = _json(out / "doctor.json")
    if not doctor:
        return []
    bad = [c for c in doctor["checks"] if not c["ok"]]
    head = f"- **qmoe doctor:** {'ready' if doctor['ok'] else 'broken'}"
    optional = {True: "", False: " (optional)"}
    return [head + (":" if bad else "")] + [f"  - ✗ {c['name']}{optional[c['required']]}: {c['detail']}" for c in bad]


def summary(args) -> int:
    out = Path(args.out)
    steps = _steps(out)
    title = "GPU validation" + (" — DRY RUN on CPU with tiny sizes (not GPU results)" if args.dry_run else "")
    lines = [f"## {title}", ""]
    lines += _machine(out)
    total = sum(s for _, _, s in steps)
    lines.append(f"- **Command:** `bash benchmarks/gpu_validation.sh{' --dry-run' if args.dry_run else ''}`, {total} s")
    lines += _tests(out) + _doctor(out)
    lines += ["", "| step | result | time |", "|---|---|---|"]
    for name, status, seconds in steps:
        result = "ok" if status == "0" else ("skipped" if status == "skipped" else f"**FAILED** (exit {status})")
        lines.append(f"| {name} | {result} | {seconds} s |")
    lines.append("")
    lines += _bench_rows(out) + _layer_kernel_rows(out) + _quickstart(out)
    generation = out / "generation.md"
    if generation.is_file():
        lines += ["### Chat generation, base vs each method's freshly attached adapter", "", generation.read_text()]
    compiled = out / "generation-compiled.md"
    if compiled.is_file():
        lines += ["### The same with the decode step compiled (`qmoe chat --compile`)", "", compiled.read_text()]
    text = "\n".join(lines).rstrip() + "\n"
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="the quick benchmark plan (or --tiny) to JSON and Markdown")
    p.add_argument("--device", choices=["cpu", "cuda"], required=True)
    p.add_argument("--tiny", action="store_true", help="the dry run's sizes")
    p.add_argument("--methods", nargs="+", help="keep only these methods")
    p.add_argument("--json", required=True)
    p.add_argument("--markdown", required=True)
    p.set_defaults(run=bench)
    p = sub.add_parser("tests-ran", help="exit 1 unless every collected GPU test ran")
    p.add_argument("junit")
    p.set_defaults(run=tests_ran)
    p = sub.add_parser("summary", help="write OUT/summary.md from the files of a validation run")
    p.add_argument("out")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(run=summary)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
