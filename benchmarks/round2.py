"""Issue 21's results, round two: each method at its own best learning rate, then the learning curve and the
task mixture at that rate. Model selection uses a validation split (the last 500 problems of the GSM8K
training file, never trained on); test sets are touched once, at the end, by the selected runs only.

    python benchmarks/round2.py --stage sweep      # 5 methods x 3 learning rates, 50 steps each; selection
    python benchmarks/round2.py --stage curve      # each method at its best rate on 800 (and 2,000) problems
    python benchmarks/round2.py --stage mixture    # GSM8K + ARC-Easy + BoolQ + OpenBookQA, best rates
    python benchmarks/round2.py --stage test       # GSM8K test answer NLL of the selected runs, once
    python benchmarks/round2.py --stage report     # tables and figures from whatever is finished
    python benchmarks/round2.py --validate-only    # validation NLL of finished runs (a second process)

Resumable at the level of single runs: a run whose record (``benchmarks/results/round2/<stage>/<label>.json``,
committed, with its validation NLL per problem) is complete is never redone; an interrupted training resumes
from its last checkpoint (``qmoe compare``'s runner) and a finished one is reused. Each stage writes its table
(``benchmarks/results/round2/<stage>.md``) as soon as it has results, and the script prints the remaining
training steps and a time estimate before every run. Run directories go to ``--out-dir`` (default
``runs/round2``; keep it across sessions to reuse adapters, though the records alone suffice for the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qmoe.compare.runner import _finished, train  # noqa: E402
from qmoe.compare.selection import group_of, select_best, selection_table, validation_nll  # noqa: E402
from qmoe.io import atomic_write_json, atomic_write_text  # noqa: E402

SHARED = Path(os.environ.get("QMOE_SHARED", ROOT.parent / "shared"))
GSM8K_TRAIN = SHARED / "data" / "gsm8k" / "train.jsonl"
GSM8K_TEST = SHARED / "data" / "gsm8k" / "test.jsonl"
RECORDS = ROOT / "benchmarks" / "results" / "round2"
FIGURES = ROOT / "docs" / "figures"
BATCH = 4
SWEEP_PROBLEMS = 200  # 50 steps of 4: round one's budget (RESULTS.md)
CURVE_PROBLEMS = (800, 2000)  # one epoch each; the 200-problem point is the sweep's selected run
VAL_LAST = 500  # validation: the last 500 problems of GSM8K train (the runs train on the first ones)
TEST_PROBLEMS = 500  # the selected runs' test: the first 500 problems of GSM8K test, touched once
MAX_LENGTH = 256
LEARNING_RATES = ("1e-4", "3e-4", "1e-3")
# one more rate beyond the grid's edge for a method whose best validated rate sits on that edge (once)
EDGE_RATES = {"1e-4": "3e-5", "1e-3": "3e-3"}
# equal trainable-parameter budgets (benchmarks/results_cpu.sh): alpha = 2r everywhere
METHODS = {
    "lora": ("recipes/gsm8k-lora.yaml", []),
    "loramoe": ("recipes/gsm8k-loramoe.yaml", ["adapter.r=36", "adapter.alpha=72"]),
    "moelora": ("recipes/gsm8k.yaml", []),
    "moelora-no-contrastive": ("recipes/gsm8k.yaml", ["adapter.contrastive_loss_weight=0"]),
    "loracoe": ("recipes/gsm8k-loracoe.yaml", ["adapter.r=18", "adapter.alpha=36"]),
}
_KEPT = ("method", "trainable_parameters", "train_seconds", "peak_mem_mb", "tokens_per_s", "final_loss", "steps")


def common_overrides(data: list[str], problems: int) -> list[str]:
    return [
        "model.source=builtin:smollm2-135m-instruct",
        *data,
        f"data.limit={problems}",
        f"data.max_length={MAX_LENGTH}",
        f"train.max_steps={problems // BATCH}",
        f"train.batch_size={BATCH}",
        "train.gradient_accumulation=1",
        "train.logging_steps=2",
        "train.checkpoint_steps=10",
        "model.gradient_checkpointing=false",
    ]


def lr_overrides(method: str, lr: str, steps: int) -> list[str]:
    if method != "loracoe":
        return [f"train.lr={lr}"]
    # LoRACoE's two stages scaled together: warm-up at lr, joint at lr / 4 (the recipe's 2e-4 then 5e-5)
    half, joint = steps // 2, float(lr) / 4
    return [
        f"train.stages=[{{stage: warmup, max_steps: {half}, lr: {lr}}}, "
        f"{{stage: joint, max_steps: {steps - half}, lr: {joint:.3g}}}]"
    ]


def method_run(method: str, lr: str, problems: int, data: list[str] | None = None) -> tuple[str, list[str]]:
    """(recipe, overrides) of ``method`` at ``lr`` on the first ``problems`` of ``data`` (default GSM8K train)."""
    recipe, own = METHODS[method]
    data = data or [f"data.path={GSM8K_TRAIN}"]
    return recipe, [*common_overrides(data, problems), *own, *lr_overrides(method, lr, problems // BATCH)]


def sweep_rates(method: str) -> list[str]:
    """The grid, plus the rate beyond an edge where the method's best grid rate sits on it (the optimum may
    lie outside the grid): decided once all grid rates of the method are validated."""
    grid = [f"{method}@lr{lr}" for lr in LEARNING_RATES]
    records = load_records("sweep", grid)
    if not all("validation" in records.get(label, {}) for label in grid):
        return list(LEARNING_RATES)
    best = min(grid, key=lambda label: records[label]["validation"]["nll"]).split("@lr", 1)[1]
    return [*LEARNING_RATES, EDGE_RATES[best]] if best in EDGE_RATES else list(LEARNING_RATES)


def sweep_runs() -> list[tuple[str, str, list[str]]]:
    rates = {method: sweep_rates(method) for method in METHODS}
    return [(f"{m}@lr{lr}", *method_run(m, lr, SWEEP_PROBLEMS)) for m in METHODS for lr in rates[m]]


def best_rates() -> dict[str, str]:
    """{method: learning rate} selected by the sweep's validation NLL, for the methods whose sweep runs (grid and
    edge extension) are all validated (the later stages run those, and say which methods still wait)."""
    runs = [label for label, _, _ in sweep_runs()]
    records = load_records("sweep", runs)
    validated = {label: r["validation"] for label, r in records.items() if "validation" in r}
    complete = {m for m in METHODS if all(label in validated for label in runs if group_of(label) == m)}
    waiting = [m for m in METHODS if m not in complete]
    if waiting:
        print(f"the sweep has not validated every rate of {', '.join(waiting)} yet: those wait", flush=True)
    best = select_best({label: v for label, v in validated.items() if group_of(label) in complete})
    return {group: label.split("@lr", 1)[1] for group, label in best.items()}


def curve_runs() -> list[tuple[str, str, list[str]]]:
    rates = best_rates()
    return [(f"{m}@n{n}", *method_run(m, rates[m], n)) for n in CURVE_PROBLEMS for m in METHODS if m in rates]


MIXTURE_TASKS = ("ARC-Easy", "boolq", "openbookqa")
MIXTURE_PER_TASK = 100  # training problems per task (GSM8K's are its first 100): 400 problems, 100 steps of 4
MIXTURE_VAL_PER_TASK = 125  # validation problems per task: the last ones of each training file
MIXTURE_TEST_PER_TASK = 200  # multiple-choice test problems per task: the first ones of each test file
ROUTING_TEXTS = 40  # validation problems per task whose routing is traced (prompt + reference answer)


def mixture_file(out_dir: Path) -> Path:
    """GSM8K + the three commonsense training sets in one LLM-Adapters-format JSON file (instruction / output /
    answer), interleaved task by task so every batch mixes tasks; written once into ``out_dir``."""
    from qmoe.data import load_gsm8k

    path = out_dir / "mixture-train.json"
    if path.is_file():
        return path
    per_task = {
        "gsm8k": [
            {"instruction": r["prompt"], "output": r["target"], "answer": r["gold"]}
            for r in load_gsm8k("train", path=str(GSM8K_TRAIN), limit=MIXTURE_PER_TASK)
        ]
    }
    for task in MIXTURE_TASKS:
        rows = json.loads((SHARED / "data" / "llm-adapters" / "dataset" / task / "train.json").read_text())
        per_task[task] = rows[:MIXTURE_PER_TASK]
    mixed = [rows[i] for i in range(MIXTURE_PER_TASK) for rows in per_task.values()]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(mixed))
    return path


def mixture_runs(out_dir: Path) -> list[tuple[str, str, list[str]]]:
    rates, data = best_rates(), mixture_file(out_dir)
    problems = MIXTURE_PER_TASK * (1 + len(MIXTURE_TASKS))
    runs = []
    for method in (m for m in METHODS if m in rates):
        recipe, overrides = method_run(method, rates[method], problems, [f"data.source={data}", "data.format=alpaca"])
        runs.append((f"{method}@mixture", recipe, overrides))
    return runs


# ------------------------------------------------------------------------------------------- run, record


class Estimate:
    """Remaining time from the seconds per training step measured so far in this invocation."""

    def __init__(self, steps_left: int):
        self.steps_left, self.seconds, self.steps = steps_left, 0.0, 0

    def done(self, steps: int, seconds: float) -> None:
        self.steps_left -= steps
        self.seconds += seconds
        self.steps += steps

    def __str__(self) -> str:
        if not self.steps:
            return f"{self.steps_left} training steps left (no timing yet)"
        left = self.steps_left * self.seconds / self.steps
        return f"{self.steps_left} training steps left, about {left / 60:.0f} min of training"


def _steps(overrides: list[str]) -> int:
    return int(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.max_steps=")))


def _children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


def record_path(stage: str, label: str) -> Path:
    return RECORDS / stage / f"{label}.json"


def load_records(stage: str, labels: list[str]) -> dict[str, dict]:
    return {
        label: json.loads(record_path(stage, label).read_text())
        for label in labels
        if record_path(stage, label).is_file()
    }


def train_stage(stage: str, runs: list[tuple[str, str, list[str]]], out_dir: Path) -> None:
    """Train every run of ``stage`` that has no record yet, writing its record when it finishes."""
    todo = [r for r in runs if not record_path(stage, r[0]).is_file()]
    estimate = Estimate(sum(_steps(o) for _, _, o in todo))
    for label, recipe, overrides in todo:
        print(f"[{stage}] {label}: {estimate}", flush=True)
        cpu0, wall0 = _children_cpu(), time.perf_counter()
        result = train(label, recipe, overrides, out_dir / stage)
        if result.error:
            print(f"[{stage}] {label} failed: {result.error}", flush=True)
            continue
        estimate.done(_steps(overrides), time.perf_counter() - wall0)
        record = {k: v for k, v in result.as_record().items() if k in _KEPT}
        cpu = _children_cpu() - cpu0  # ~0 when a run finished by another process was reused: not measured here
        record.update(label=label, recipe=recipe, overrides=overrides, cpu_seconds=cpu if cpu > 1 else None)
        record_path(stage, label).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record_path(stage, label), record)


def validation_sets() -> dict[str, list[dict]]:
    """The validation problems: GSM8K's last 500 (and, for the mixture, each commonsense set's last 125)."""
    from qmoe.compare.selection import validation_records
    from qmoe.data import llm_adapters_record

    sets = {"gsm8k": validation_records(GSM8K_TRAIN, VAL_LAST, max(CURVE_PROBLEMS))}
    for task in MIXTURE_TASKS:
        path = SHARED / "data" / "llm-adapters" / "dataset" / task / "train.json"
        rows = json.loads(path.read_text())
        sets[task] = [llm_adapters_record(r, path, i) for i, r in enumerate(rows)][-MIXTURE_VAL_PER_TASK:]
    return sets


def validate_stage(stage: str, labels: list[str], out_dir: Path, tasks: tuple[str, ...] = ("gsm8k",)) -> None:
    """Validation NLL (per task in ``tasks``) of every finished run of ``stage`` whose record lacks it."""
    sets = None
    for label in labels:
        path = record_path(stage, label)
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        wanted = [t for t in tasks if f"validation-{t}" not in record and not (t == "gsm8k" and "validation" in record)]
        if not wanted:
            continue
        run_dir = out_dir / stage / label
        if not _finished(run_dir):
            print(f"[{stage}] {label}: its run directory is gone; re-run --stage {stage} to retrain it", flush=True)
            continue
        sets = sets or validation_sets()
        for task in wanted:
            print(f"[{stage}] {label}: validation NLL on {task} ({len(sets[task])} problems)", flush=True)
            start = time.process_time()
            result = validation_nll(run_dir, sets[task], max_length=MAX_LENGTH)
            result = {k: v for k, v in result.items() if k != "key"}
            result["cpu_seconds"] = time.process_time() - start
            record["validation" if task == "gsm8k" else f"validation-{task}"] = result
            atomic_write_json(path, record)


def test_sets() -> dict[str, list[dict]]:
    """The multiple-choice test problems of the mixture's commonsense tasks (touched by the finished runs only)."""
    from qmoe.data import llm_adapters_record

    sets = {}
    for task in MIXTURE_TASKS:
        path = SHARED / "data" / "llm-adapters" / "dataset" / task / "test.json"
        rows = json.loads(path.read_text())[:MIXTURE_TEST_PER_TASK]
        sets[task] = [llm_adapters_record(r, path, i) for i, r in enumerate(rows)]
    return sets


def routing_texts(tokenizer) -> dict[str, list[str]]:
    """Per task, the first validation problems as the model reads them in training (prompt + reference answer)."""
    from qmoe.data import chat_prompt

    return {
        task: [chat_prompt(tokenizer, r["prompt"]) + r["target"] for r in records[:ROUTING_TEXTS]]
        for task, records in validation_sets().items()
    }


def measure_mixture_run(record: dict, run_dir: Path | None) -> dict:
    """Multiple-choice test accuracy per commonsense task and routing by task (with the untrained router's, the
    baseline) of one finished mixture run; ``run_dir`` None measures the base model alone."""
    from qmoe.chat import load_chat_model
    from qmoe.compare.mixture import choice_accuracy, task_routing
    from qmoe.compare.specialisation import untrained_chat

    start = time.process_time()
    chat = load_chat_model(run_dir, base_source=None if run_dir else "builtin:smollm2-135m-instruct", dequantize="on")
    record["choices"] = {
        task: choice_accuracy(chat.model, chat.tokenizer, problems, max_length=MAX_LENGTH)
        for task, problems in test_sets().items()
    }
    if run_dir is not None:
        texts = routing_texts(chat.tokenizer)
        routed = task_routing(chat, texts)
        if routed:
            record["routing-by-task"] = routed
            del chat
            record["routing-by-task-untrained"] = task_routing(untrained_chat(run_dir), texts)
    record["measure_cpu_seconds"] = time.process_time() - start
    return record


def measure_mixture(labels: list[str], out_dir: Path, with_base: bool) -> None:
    """measure_mixture_run for every validated mixture run lacking it, and the base model once (``with_base``)."""
    base = record_path("mixture", "base")
    if with_base and not base.is_file():
        print("[mixture] base model: multiple-choice test accuracy", flush=True)
        atomic_write_json(base, measure_mixture_run({"label": "base"}, None))
    for label in labels:
        path = record_path("mixture", label)
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        run_dir = out_dir / "mixture" / label
        if "choices" in record or not _finished(run_dir):
            continue
        print(f"[mixture] {label}: multiple-choice test accuracy and routing by task", flush=True)
        atomic_write_json(path, measure_mixture_run(record, run_dir))


def selected_runs() -> list[tuple[str, str]]:
    """(stage, label) of every selected configuration: each method's sweep-selected run (200 problems) and its
    learning-curve runs (the same rate, more problems)."""
    rates = best_rates()
    return [("sweep", f"{m}@lr{lr}") for m, lr in rates.items()] + [
        ("curve", f"{m}@n{n}") for n in CURVE_PROBLEMS for m in rates
    ]


def budget_of(stage: str, label: str) -> int:
    """Training problems of a selected run: the sweep's 200, or the curve run's N."""
    return SWEEP_PROBLEMS if stage == "sweep" else int(label.rsplit("@n", 1)[1])


def test_stage(methods: list[str], out_dir: Path, problems: int | None = None) -> None:
    """GSM8K test answer NLL of every selected, validated run of ``methods`` (trained on ``problems``, default
    any) that lacks it (cached per run dir)."""
    from qmoe.compare.selection import TEST_FILE
    from qmoe.data import load_gsm8k

    test = None
    for stage, label in selected_runs():
        path = record_path(stage, label)
        if group_of(label) not in methods or not path.is_file() or problems not in (None, budget_of(stage, label)):
            continue
        record = json.loads(path.read_text())
        if "test" in record or "validation" not in record:
            continue
        run_dir = out_dir / stage / label
        if not _finished(run_dir):
            print(f"[test] {label}: its run directory is gone; re-run --stage {stage} to retrain it", flush=True)
            continue
        test = test or load_gsm8k("test", path=str(GSM8K_TEST), limit=TEST_PROBLEMS)
        print(f"[test] {label}: GSM8K test answer NLL ({len(test)} problems)", flush=True)
        start = time.process_time()
        result = validation_nll(run_dir, test, max_length=MAX_LENGTH, cache_file=TEST_FILE)
        record["test"] = {k: v for k, v in result.items() if k != "key"} | {"cpu_seconds": time.process_time() - start}
        atomic_write_json(path, record)


# ------------------------------------------------------------------------------------------- report


def cpu_seconds(records) -> float:
    """CPU seconds the records measured: training, and every validation, test and mixture measurement of them (a
    run trained by another process than the one that recorded it has no training time: not counted)."""
    total = 0.0
    for record in records:
        total += (record.get("cpu_seconds") or 0) + record.get("measure_cpu_seconds", 0)
        total += sum(v.get("cpu_seconds", 0) for v in record.values() if isinstance(v, dict))
    return total


def report_sweep() -> str | None:
    labels = [label for label, _, _ in sweep_runs()]
    records = load_records("sweep", labels)
    nll = {label: r["validation"] for label, r in records.items() if "validation" in r}
    if not nll:
        return None
    extra = {
        label: {
            "train loss (last)": f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "",
            "train CPU s": f"{r['cpu_seconds']:.0f}" if r.get("cpu_seconds") else "—",
        }
        for label, r in records.items()
        if label in nll
    }
    total_cpu = cpu_seconds(records.values())
    table = selection_table(nll, extra)
    missing = [label for label in labels if label not in nll]
    note = f"\n{len(nll)} of {len(labels)} runs validated" + (
        f"; still to run: {', '.join(missing)}" if missing else ""
    )
    text = (
        f"Validation answer NLL (last {VAL_LAST} problems of GSM8K train; runs trained on its first "
        f"{SWEEP_PROBLEMS}, {SWEEP_PROBLEMS // BATCH} steps of {BATCH}). Total CPU time so far: "
        f"{total_cpu / 3600:.1f} h (training and validation).\n\n{table}{note}.\n\n{best_against_lora(nll)}"
    )
    atomic_write_text(RECORDS / "sweep.md", text)
    sweep_figure(nll)
    return text


def best_against_lora(nll: dict[str, dict]) -> str:
    """Each method's best validated run (so far) against LoRA's best, paired: the comparison at each method's
    own rate that round one could not make."""
    from qmoe.compare.statistics import paired_nll_difference

    best = select_best(nll)
    if "lora" not in best:
        return ""
    lines = ["| method | its best rate so far | validation NLL | Δ vs LoRA at its best (95% CI) |", "|---|---|---|---|"]
    for group in (g for g in METHODS if g in best):
        label = best[group]
        diff = None if group == "lora" else paired_nll_difference(nll[label], nll[best["lora"]])
        delta = "—" if diff is None else f"{diff[0]:+.4f} (±{diff[1]:.4f})"
        lines.append(f"| {group} | {label.split('@lr', 1)[1]} | {nll[label]['nll']:.4f} | {delta} |")
    return "Each method at its best validated rate, against LoRA at its own:\n\n" + "\n".join(lines) + "\n"


def _save_nll_figure(fig, ax, xlabel: str, title: str, name: str) -> Path:
    """The round-two figures' shared axes (log x, validation NLL on y, legend), saved as FIGURES/name.png."""
    from qmoe.compare.plots import save_figure

    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"validation answer NLL (GSM8K train, last {VAL_LAST})")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, FIGURES / f"{name}.png")


def sweep_figure(nll: dict[str, dict]) -> Path:
    """Validation NLL against learning rate, one line per method, with each point's paired 95% interval
    against its method's best (the best's own point has none)."""
    import matplotlib.pyplot as plt

    from qmoe.compare.statistics import paired_nll_difference

    best = select_best(nll)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for group in METHODS:
        points = sorted(
            ((float(label.split("@lr", 1)[1]), label) for label in nll if group_of(label) == group), key=lambda p: p[0]
        )
        if not points:
            continue
        xs = [x for x, _ in points]
        ys = [nll[label]["nll"] for _, label in points]
        errs = []
        for _, label in points:
            diff = None if label == best[group] else paired_nll_difference(nll[label], nll[best[group]])
            errs.append(0.0 if diff is None else diff[1])
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=group)
    xlabel = "learning rate (LoRACoE: warm-up stage; joint stage at a quarter)"
    return _save_nll_figure(
        fig, ax, xlabel, "Learning-rate sweep, 50 steps, equal parameter budgets", "round2-lr-sweep"
    )


def report_curve() -> str | None:
    """Validation NLL against training problems seen (the sweep's selected run is the 200 point), per method,
    with 95% intervals; each point's difference from LoRA at the same budget, paired."""
    from qmoe.compare.statistics import nll_halfwidth, paired_nll_difference

    sweep = load_records("sweep", [label for label, _, _ in sweep_runs()])
    rates = best_rates()
    points: dict[str, dict[int, dict]] = {}
    for method, lr in rates.items():
        points[method] = {SWEEP_PROBLEMS: sweep[f"{method}@lr{lr}"]["validation"]}
        for n in CURVE_PROBLEMS:
            record = load_records("curve", [f"{method}@n{n}"]).get(f"{method}@n{n}", {})
            if "validation" in record:
                points[method][n] = record["validation"]
    if not any(len(p) > 1 for p in points.values()):
        return None
    sizes = [SWEEP_PROBLEMS, *CURVE_PROBLEMS]
    lines = ["| method (lr) | " + " | ".join(f"{n} problems" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method, by_n in points.items():
        cells = []
        for n in sizes:
            if n not in by_n:
                cells.append("—")
                continue
            cell = f"{by_n[n]['nll']:.4f} ±{nll_halfwidth(by_n[n]):.4f}"
            lora = points.get("lora", {}).get(n)
            if method != "lora" and lora is not None:
                diff = paired_nll_difference(by_n[n], lora)
                if diff is not None:
                    cell += f" (vs LoRA {diff[0]:+.4f} ±{diff[1]:.4f})"
            cells.append(cell)
        lines.append(f"| {method} ({rates[method]}) | " + " | ".join(cells) + " |")
    curve = load_records("curve", [f"{m}@n{n}" for m in rates for n in CURVE_PROBLEMS])
    hours = cpu_seconds(curve.values()) / 3600
    text = (
        f"Validation answer NLL (last {VAL_LAST} problems of GSM8K train) after one epoch on the first N problems "
        "(batch 4), each method at its selected learning rate; ± is a 95% interval, and the difference from LoRA "
        f"at the same N is paired. CPU time of the curve runs beyond the sweep: {hours:.1f} h (training and "
        "validation).\n\n" + "\n".join(lines) + "\n"
    )
    atomic_write_text(RECORDS / "curve.md", text)
    curve_figure(points, rates)
    return text


def curve_figure(points: dict[str, dict[int, dict]], rates: dict[str, str]) -> Path:
    import matplotlib.pyplot as plt

    from qmoe.compare.statistics import nll_halfwidth

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, by_n in points.items():
        sizes = sorted(by_n)
        ax.errorbar(
            sizes,
            [by_n[n]["nll"] for n in sizes],
            yerr=[nll_halfwidth(by_n[n]) for n in sizes],
            marker="o",
            capsize=3,
            label=f"{method} (lr {rates[method]})",
        )
    title = "Learning curve at each method's selected learning rate (95% intervals)"
    return _save_nll_figure(fig, ax, "training problems seen (one epoch, batch 4)", title, "round2-learning-curve")


def report_test() -> str | None:
    """The selected runs on the test problems, each against LoRA at the same budget (paired), beside what the
    validation split said: does the selection hold on data it never saw?"""
    from qmoe.compare.statistics import nll_halfwidth, paired_nll_difference

    by_budget: dict[int, dict[str, dict]] = {}
    for stage, label in selected_runs():
        record = load_records(stage, [label]).get(label, {})
        if "test" in record:
            by_budget.setdefault(budget_of(stage, label), {})[group_of(label)] = record
    if not by_budget:
        return None
    lines = [
        "| training problems | method | test NLL | Δ vs LoRA on test (95% CI) | Δ vs LoRA on validation (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for n in sorted(by_budget):
        lora = by_budget[n].get("lora")
        for method in (m for m in METHODS if m in by_budget[n]):
            record = by_budget[n][method]
            cells = [f"{record['test']['nll']:.4f} ±{nll_halfwidth(record['test']):.4f}"]
            for split in ("test", "validation"):
                diff = None if method == "lora" or lora is None else paired_nll_difference(record[split], lora[split])
                cells.append("—" if diff is None else f"{diff[0]:+.4f} (±{diff[1]:.4f})")
            lines.append(f"| {n} | {method} | " + " | ".join(cells) + " |")
    text = (
        f"GSM8K test answer NLL (first {TEST_PROBLEMS} problems of the official test split) of each method's "
        "selected runs, measured once after selection; ± is a 95% interval over problems.\n\n" + "\n".join(lines) + "\n"
    )
    atomic_write_text(RECORDS / "test.md", text)
    return text


def report_mixture() -> str | None:
    """Per-task validation NLL, multiple-choice test accuracy and routing by task of the mixture's runs, each
    method against LoRA trained on the same mixture (paired: NLL intervals, exact sign tests on accuracy)."""
    from qmoe.compare.mixture import task_specialisation
    from qmoe.compare.statistics import paired_nll_difference, sign_test_p, wilson_interval

    labels = [f"{m}@mixture" for m in METHODS]
    records = load_records("mixture", labels)
    if not any("validation" in r for r in records.values()):
        return None
    lora = records.get("lora@mixture", {})
    tasks = ("gsm8k", *MIXTURE_TASKS)

    def nll_of(record: dict, task: str) -> dict | None:
        return record.get("validation" if task == "gsm8k" else f"validation-{task}")

    lines = ["| method (lr) | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for label, record in records.items():
        cells = []
        for task in tasks:
            mine, ref = nll_of(record, task), nll_of(lora, task)
            if mine is None:
                cells.append("—")
                continue
            diff = None if label == "lora@mixture" or ref is None else paired_nll_difference(mine, ref)
            cells.append(f"{mine['nll']:.4f}" + ("" if diff is None else f" ({diff[0]:+.4f} ±{diff[1]:.4f})"))
        lines.append(f"| {group_of(label)} ({_rate(record)}) | " + " | ".join(cells) + " |")
    nll_table = "\n".join(lines)

    base = load_records("mixture", ["base"]).get("base", {})
    rows = [("base model, no adapter", base)] + [(group_of(label), r) for label, r in records.items()]
    lines = ["| method | " + " | ".join(MIXTURE_TASKS) + " |", "|---|" + "---|" * len(MIXTURE_TASKS)]
    for name, record in rows:
        if "choices" not in record:
            continue
        cells = []
        for task in MIXTURE_TASKS:
            mine = record["choices"][task]
            low, high = wilson_interval(mine["correct"], mine["n"])
            cell = f"{100 * mine['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
            ref = lora.get("choices", {}).get(task)
            if ref is not None and record is not lora:
                pairs = list(zip(mine["per_example"], ref["per_example"], strict=True))
                wins, losses = sum(a > b for a, b in pairs), sum(a < b for a, b in pairs)
                cell += f" (vs LoRA {100 * (wins - losses) / len(pairs):+.1f} pts, p={sign_test_p(wins, losses):.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    choice_table = "\n".join(lines)

    routed = {group_of(label): r for label, r in records.items() if "routing-by-task" in r}
    lines = ["| method | experts | " + " | ".join(f"{t} (untrained)" for t in tasks) + " | mean (untrained) |"]
    lines.append("|---|---|" + "---|" * (len(tasks) + 1))
    for name, record in routed.items():
        trained = task_specialisation(record["routing-by-task"])
        # no untrained routing where the fresh adapter routes nothing (LoRACoE starts in its LoRA warm-up stage)
        before = record["routing-by-task-untrained"]
        untrained = task_specialisation(before) if before else {"task_vs_all_tv": {}, "mean": None}

        def cell(now: float, then: float | None) -> str:
            return f"{now:.3f} ({'n/a' if then is None else f'{then:.3f}'})"

        experts = len(next(iter(record["routing-by-task"].values()))[0])
        cells = [cell(trained["task_vs_all_tv"][t], untrained["task_vs_all_tv"].get(t)) for t in tasks]
        mean = cell(trained["mean"], untrained["mean"])
        lines.append(f"| {name} | {experts} | " + " | ".join(cells) + f" | {mean} |")
    routing_table = "\n".join(lines) if routed else "(no run with a router measured yet)"
    tables = [expert_by_task_table(name, r["routing-by-task"]) for name, r in routed.items() if name != "loracoe"]
    if routed:
        mixture_routing_figure(routed)
    missing = [label for label in labels if "choices" not in records.get(label, {})]
    text = (
        f"Trained on {MIXTURE_PER_TASK} problems each of GSM8K, {', '.join(MIXTURE_TASKS)} interleaved "
        f"({MIXTURE_PER_TASK * (1 + len(MIXTURE_TASKS)) // BATCH} steps of {BATCH}), each method at its sweep-selected "
        f"learning rate. CPU time: {cpu_seconds([*records.values(), base]) / 3600:.1f} h (training, validation, "
        "test and routing measurements).\n\n"
        f"Validation answer NLL per task (GSM8K: last {VAL_LAST} of its training file; the others: last "
        f"{MIXTURE_VAL_PER_TASK} of theirs), in brackets the paired difference from LoRA with its 95% interval:\n\n"
        f"{nll_table}\n\n"
        f"Multiple-choice test accuracy (first {MIXTURE_TEST_PER_TASK} problems of each test set; the likeliest "
        "allowed answer; Wilson 95% intervals; against LoRA: net points over the same problems and the exact "
        f"sign test's p):\n\n{choice_table}\n\n"
        f"Routing by task (down_proj of every layer, top-1 expert of each token of {ROUTING_TEXTS} validation "
        "problems per task, prompt and answer): each task's total-variation distance from the all-task load, "
        "averaged over layers, with the same adapter's router before training in brackets (0 = the task's tokens "
        f"go where every task's go; 1 - 1/{len(tasks)} = experts of its own; LoRACoE's experts are its ranks):"
        f"\n\n{routing_table}\n"
        + "".join(f"\n{t}\n" for t in tables)
        + (f"\nStill to measure: {', '.join(missing)}.\n" if missing else "")
    )
    atomic_write_text(RECORDS / "mixture.md", text)
    return text


def _rate(record: dict) -> str:
    """The learning rate a run was trained at, from its overrides (LoRACoE: its warm-up stage's)."""
    for override in record.get("overrides", []):
        if override.startswith("train.lr="):
            return override.split("=", 1)[1]
        if override.startswith("train.stages="):
            return override.split("lr: ", 1)[1].split("}", 1)[0]
    return "?"


def middle_layer(shares: dict[str, list]) -> int:
    """The layer the expert-by-task tables and heat maps show: the middle one (a fixed choice, not the most
    specialised one, which would flatter every method)."""
    return len(next(iter(shares.values()))) // 2


def expert_by_task_table(name: str, shares: dict[str, list]) -> str:
    """Markdown: the share of each task's tokens whose top-1 expert is e, at the middle layer."""
    layer = middle_layer(shares)
    experts = len(shares[next(iter(shares))][layer])
    lines = [
        f"{name}, layer {layer} (`mlp.down_proj`): share of each task's tokens per top-1 expert",
        "",
        "| task | " + " | ".join(f"e{e}" for e in range(experts)) + " |",
        "|---|" + "---|" * experts,
    ]
    for task, rows in shares.items():
        lines.append(f"| {task} | " + " | ".join(f"{100 * v:.0f}%" for v in rows[layer]) + " |")
    return "\n".join(lines)


def mixture_routing_figure(routed: dict[str, dict]) -> Path:
    """Per routed method: above, the middle layer's share of each task's tokens per top-1 expert; below, each
    layer's task-vs-all routing distance (mean over tasks), trained router against the untrained one."""
    import matplotlib.pyplot as plt
    import numpy as np

    from qmoe.compare.mixture import task_specialisation
    from qmoe.compare.plots import save_figure

    fig, axes = plt.subplots(2, len(routed), figsize=(3.6 * len(routed), 5.6), squeeze=False)
    for column, (name, record) in enumerate(routed.items()):
        shares = record["routing-by-task"]
        tasks, layer = list(shares), middle_layer(shares)
        ax = axes[0][column]
        matrix = np.array([shares[t][layer] for t in tasks])
        ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        if matrix.shape[1] <= 8:  # shares written in (LoRACoE's ranks are too many to label)
            for (row, col), value in np.ndenumerate(matrix):
                color = "white" if value < 0.6 else "black"
                ax.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=6, color=color)
        ax.set_yticks(range(len(tasks)), tasks if column == 0 else [""] * len(tasks), fontsize=8)
        ax.set_xlabel("rank" if name == "loracoe" else "expert", fontsize=8)
        ax.set_title(f"{name}: layer {layer}, top-1 share", fontsize=9)
        ax = axes[1][column]
        for key, style in (("routing-by-task", "-"), ("routing-by-task-untrained", "--")):
            if not record[key]:  # an untrained adapter that routes nothing (LoRACoE's warm-up stage)
                continue
            by_layer = task_specialisation(record[key])["by_layer"]
            ax.plot(range(len(by_layer)), by_layer, style, label="trained" if style == "-" else "untrained")
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylim(0, 1 - 1 / len(tasks))
        if column == 0:
            ax.set_ylabel("task vs all-task routing (TV)", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle("Routing by task in the mixture runs", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, FIGURES / "round2-mixture-routing.png")


RESULTS_BEGIN, RESULTS_END = "<!-- round2: begin (generated) -->", "<!-- round2: end -->"
COMMANDS = """```bash
python benchmarks/round2.py --stage sweep     # 5 methods x 3 learning rates (+ the rate beyond an edge), 50 steps
python benchmarks/round2.py --stage curve --problems 800   # each method at its selected rate, one epoch
python benchmarks/round2.py --stage mixture   # GSM8K + ARC-Easy + BoolQ + OpenBookQA at the selected rates
python benchmarks/round2.py --stage test      # the selected runs on GSM8K test, once
python benchmarks/round2.py --stage report    # this block, from the committed records
```"""


def results_block(sections: dict[str, str | None], results_file: Path) -> str:
    """RESULTS.md's generated round-two block: the commands, then each stage's table and figure that exists (linked
    relative to ``results_file``)."""
    figures = {
        "sweep": "round2-lr-sweep.png",
        "curve": "round2-learning-curve.png",
        "mixture": "round2-mixture-routing.png",
    }
    titles = {
        "sweep": "Learning-rate sweep (selection on the validation split)",
        "curve": "Learning curve at each method's selected rate",
        "mixture": "Task mixture",
        "test": "The selected runs on the test set",
    }
    out = [
        "### Round two, measured (generated by `python benchmarks/round2.py --stage report`)",
        "",
        "Produced by (each command resumable; finished runs are never redone; records in "
        "`benchmarks/results/round2/`):",
        "",
        COMMANDS,
    ]
    for stage, text in sections.items():
        if not text:
            continue
        out += ["", f"#### {titles[stage]}", "", text.rstrip("\n")]
        if stage in figures and (FIGURES / figures[stage]).is_file():
            link = os.path.relpath(FIGURES / figures[stage], Path(results_file).resolve().parent)
            out += ["", f"![{titles[stage]}]({link})"]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("sweep", "curve", "mixture", "test", "report"), default="sweep")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "round2")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "RESULTS.md", help="report: the file whose round-two block is replaced"
    )
    parser.add_argument("--validate-only", action="store_true", help="only the validation NLL of finished runs")
    parser.add_argument(
        "--methods",
        type=lambda text: text.split(","),
        default=list(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)} (to split a stage between processes)",
    )
    parser.add_argument(
        "--problems",
        type=int,
        choices=(SWEEP_PROBLEMS, *CURVE_PROBLEMS),
        help="curve and test stages: only this training-set size (the default: every size)",
    )
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.stage in ("sweep", "report"):
        runs = sweep_runs()
        if args.stage == "sweep":
            if not args.validate_only:
                train_stage("sweep", runs, args.out_dir)
            validate_stage("sweep", [label for label, _, _ in runs], args.out_dir)
        print(report_sweep() or "no validated sweep run yet")
        if args.stage == "report":
            from qmoe.compare.report import merge_into

            sections = {
                "sweep": (RECORDS / "sweep.md").read_text() if (RECORDS / "sweep.md").is_file() else None,
                "curve": report_curve(),
                "mixture": report_mixture(),
                "test": report_test(),
            }
            block = results_block(sections, args.results)
            print(block)
            atomic_write_text(args.results, merge_into(args.results, block, RESULTS_BEGIN, RESULTS_END))
            print(f"wrote {args.results}")
        return 0
    if args.stage == "test":
        test_stage(args.methods, args.out_dir, args.problems)
        print(report_test() or "no selected run tested yet")
        return 0
    if args.stage == "curve":
        if args.problems == SWEEP_PROBLEMS:
            parser.error(f"--problems {SWEEP_PROBLEMS} is the sweep's budget; the curve runs {CURVE_PROBLEMS}")
        runs = [r for r in curve_runs() if args.problems is None or r[0].endswith(f"@n{args.problems}")]
        tasks: tuple[str, ...] = ("gsm8k",)
    else:
        runs, tasks = mixture_runs(args.out_dir), ("gsm8k", *MIXTURE_TASKS)
    runs = [r for r in runs if group_of(r[0]) in args.methods]
    if not args.validate_only:
        train_stage(args.stage, runs, args.out_dir)
    validate_stage(args.stage, [label for label, _, _ in runs], args.out_dir, tasks)
    if args.stage == "curve":
        print(report_curve() or "no validated curve run yet")
    else:
        # the base model's accuracy is measured with LoRA's runs, the reference every method is compared with
        measure_mixture([label for label, _, _ in runs], args.out_dir, with_base="lora" in args.methods)
        print(report_mixture() or "no measured mixture run yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
