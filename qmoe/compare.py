"""``qmoe compare``: train several recipes, evaluate every adapter and the base model on the same test sets,
and write a results table (RESULTS.md) with the exact command that produced it.

Training and evaluation run as ``qmoe finetune`` / ``qmoe eval`` subprocesses, so each gets a clean process
(peak memory is per run) and a crash in one run is reported, not fatal. Everything is resumable: a finished
run (status.json ``finished`` + ``adapter/``) and an existing ``eval-<task>.json`` are reused, so re-running
the same command after an interruption only does what is missing.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cli import UsageError
from .heldout import paired_nll_difference
from .io import atomic_write_json, atomic_write_text, read_jsonl
from .significance import PairedOutcome, paired_outcome, wilson_halfwidth


@dataclass
class RunResult:
    label: str
    recipe: str
    run_dir: Path
    method: str = ""
    trainable_parameters: int | None = None
    train_seconds: float | None = None
    peak_mem_mb: float | None = None
    tokens_per_s: float | None = None
    final_loss: float | None = None
    steps: int | None = None
    accuracy: dict[str, float | None] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    heldout: dict | None = None  # qmoe.heldout.answer_nll on GSM8K test
    error: str | None = None


def qmoe_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "qmoe.cli", *args]


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run a subprocess with its output teed into ``log``; (exit status, wall seconds)."""
    shown = ["qmoe", *cmd[3:]] if cmd[:3] == [sys.executable, "-m", "qmoe.cli"] else cmd
    print("$ " + shlex.join(shown), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as sink:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sink.write(line)
            # progress bars redraw with \r; show the lines that end
            if "\r" not in line:
                sys.stdout.write("  " + line)
        proc.wait()
    return proc.returncode, time.perf_counter() - start


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _finished(run_dir: Path) -> bool:
    return _status(run_dir).get("state") == "finished" and (run_dir / "adapter").is_dir()


def task_slug(task: str) -> str:
    """Short column name: a task name as is; for a file, its folder when it is called test.json(l)."""
    path = Path(task)
    if path.suffix not in (".json", ".jsonl"):
        return task
    return path.parent.name if path.stem == "test" else path.stem


def train(label: str, recipe: str, overrides: list[str], out_dir: Path) -> RunResult:
    run_dir = out_dir / label
    result = RunResult(label=label, recipe=recipe, run_dir=run_dir)
    timing = run_dir / "compare-train.json"
    if not _finished(run_dir):
        args = ["finetune", recipe, *overrides, "--output-dir", str(run_dir), "--no-eval"]
        args.append("--resume" if (run_dir / "checkpoints").is_dir() else "--overwrite")
        code, seconds = _run(qmoe_command(*args), out_dir / "logs" / f"{label}-train.log")
        if code != 0:
            result.error = _status(run_dir).get("error") or f"qmoe finetune exited with {code}"
            return result
        atomic_write_json(timing, {"wall_seconds": seconds})
    status = _status(run_dir)
    result.method = status.get("method", "")
    result.trainable_parameters = status.get("trainable_parameters")
    result.steps = status.get("step")
    if timing.is_file():
        result.train_seconds = json.loads(timing.read_text())["wall_seconds"]
    metrics = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m.get("loss") is not None]
    if metrics:
        result.peak_mem_mb = max(m.get("peak_mem_mb") or 0 for m in metrics) or None
        speeds = sorted(m["tokens_per_s"] for m in metrics if m.get("tokens_per_s"))
        result.tokens_per_s = speeds[len(speeds) // 2] if speeds else None
        result.final_loss = metrics[-1].get("lm_loss", metrics[-1]["loss"])
    return result


def evaluate(
    run_dir: Path, task: str, limit: int | None, out_file: Path, base_only: bool, log: Path, extra: list[str]
) -> tuple[float | None, int]:
    if not out_file.is_file():
        args = ["eval", str(run_dir), "--task", task, "--output", str(out_file), *extra]
        if limit:
            args += ["--limit", str(limit)]
        if base_only:
            args.append("--base-only")
        code, _ = _run(qmoe_command(*args), log)
        if code != 0:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            print(f"  evaluation failed ({lines[-1] if lines else code}); see {log}", flush=True)
            return None, 0
    data = json.loads(out_file.read_text())
    return data.get("accuracy"), data.get("n", 0)


def run_compare(
    runs: list[tuple[str, str, list[str]]],
    overrides: list[str],
    tasks: list[str],
    limit: int | None,
    out_dir: Path,
    results_file: Path,
    figures_dir: Path | None,
    eval_args: list[str],
    command: str,
    pairs: list[tuple[str, str]] = (),
) -> int:
    from .recipe import load_recipe

    """``runs``: (label, recipe path, run-specific overrides); ``overrides`` apply to every run; ``pairs``:
    extra (run, reference) label pairs for the paired table, beyond every run against the first."""
    labels = [label for label, _, _ in runs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"run labels must be unique: {labels} (use --labels / --run LABEL ...)")
    for pair in pairs:
        unknown = [label for label in pair if label not in labels]
        if unknown:
            raise UsageError(f"--pair {' '.join(pair)}: no run labelled {unknown[0]!r}; runs: {', '.join(labels)}")
    for _, recipe, own in runs:  # fail fast, before hours of training, on any bad recipe or override
        load_recipe(recipe, [*overrides, *own])
    out_dir.mkdir(parents=True, exist_ok=True)

    results = [train(label, recipe, [*overrides, *own], out_dir) for label, recipe, own in runs]
    base = RunResult(label="base model", recipe="-", run_dir=out_dir / "base")
    finished = [r for r in results if r.error is None]
    for task in tasks:
        slug = task_slug(task)
        if finished:
            acc, n = evaluate(
                finished[0].run_dir,
                task,
                limit,
                base.run_dir / f"eval-{slug}.json",
                True,
                out_dir / "logs" / f"base-eval-{slug}.log",
                eval_args,
            )
            base.accuracy[slug], base.n[slug] = acc, n
        for r in finished:
            acc, n = evaluate(
                r.run_dir,
                task,
                limit,
                r.run_dir / f"eval-{slug}.json",
                False,
                out_dir / "logs" / f"{r.label}-eval-{slug}.log",
                eval_args,
            )
            r.accuracy[slug], r.n[slug] = acc, n

    heldout_losses([base, *finished], finished, limit)

    figures, specialisation = [], {}
    if figures_dir is not None:
        from .compare_plots import accuracy_figure, loss_figure
        from .specialisation import specialisation_figures

        slugs = [task_slug(t) for t in tasks]
        figures = [
            f
            for f in (
                accuracy_figure([base, *finished], slugs, figures_dir / "accuracy-per-task.png"),
                loss_figure(finished, figures_dir / "training-loss.png"),
            )
            if f is not None
        ]
        moe_figures, specialisation = specialisation_figures(
            [r for r in finished if r.method == "moelora"], figures_dir
        )
        figures += moe_figures
        atomic_write_json(out_dir / "specialisation.json", specialisation)
    atomic_write_json(out_dir / "results.json", [_as_dict(r) for r in [base, *results]])
    table = render_results([base, *results], tasks, limit, command, figures, results_file, specialisation, pairs)
    atomic_write_text(results_file, merge_into(results_file, table))
    print(f"wrote {results_file}")
    return 0 if all(r.error is None for r in results) else 1


def heldout_losses(rows: list[RunResult], finished: list[RunResult], limit: int | None) -> None:
    """Teacher-forced answer NLL on GSM8K test for every row (cached as ``heldout-gsm8k.json``)."""
    if not finished:
        return
    from .chat import load_chat_model, resolve_adapter
    from .data import load_gsm8k
    from .heldout import answer_nll

    records = None
    for r in rows:
        cache = r.run_dir / "heldout-gsm8k.json"
        if not cache.is_file():
            if records is None:
                records = load_gsm8k("test", limit=limit)
            print(f"held-out answer loss: {r.label}", flush=True)
            if r.recipe == "-":  # the base model: the first run's backbone, loaded as it was, without the adapter
                source, quantization, dtype, _ = resolve_adapter(finished[0].run_dir)
                chat = load_chat_model(None, base_source=source, quantization=quantization, compute_dtype=dtype)
            else:
                chat = load_chat_model(r.run_dir)
            atomic_write_json(cache, answer_nll(chat.model, chat.tokenizer, records))
            del chat
        r.heldout = json.loads(cache.read_text())


BEGIN, END = "<!-- qmoe compare: begin (generated) -->", "<!-- qmoe compare: end -->"


def merge_into(results_file: Path, table: str) -> str:
    """The results file with the generated block replaced, keeping any hand-written text around it."""
    block = f"{BEGIN}\n{table}{END}\n"
    if not results_file.is_file():
        return "# Results\n\n" + block
    text = results_file.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + block


def _as_dict(r: RunResult) -> dict:
    d = dict(r.__dict__)
    d["run_dir"] = str(r.run_dir)
    if r.heldout:  # per-problem sums stay in the run's heldout-gsm8k.json
        d["heldout"] = {k: v for k, v in r.heldout.items() if k != "per_example"}
    return d


def _fmt(value, spec: str, empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def render_results(
    rows: list[RunResult],
    tasks: list[str],
    limit: int | None,
    command: str,
    figures: list[Path],
    results_file: Path,
    specialisation: dict | None = None,
    pairs=(),
) -> str:
    slugs = [task_slug(t) for t in tasks]
    head = [
        "method (run)",
        *[f"{s} acc %" for s in slugs],
        "mean acc %",
        "GSM8K answer NLL",
        "trainable params",
        "train time (s)",
        "peak mem (MB)",
        "tokens/s",
        "final train loss",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        accs = [r.accuracy.get(s) for s in slugs]
        known = [a for a in accs if a is not None]
        mean = sum(known) / len(known) if known and len(known) == len(accs) else None
        name = r.label if r.recipe == "-" else f"{r.method or '?'} ({r.label})"
        if r.error:
            name += f" — failed: {r.error}"
        cells = [
            name,
            *[_fmt(a * 100 if a is not None else None, ".1f") for a in accs],
            _fmt(mean * 100 if mean is not None else None, ".1f"),
            _fmt(r.heldout["nll"] if r.heldout else None, ".3f"),
            _fmt(r.trainable_parameters, ","),
            _fmt(r.train_seconds, ".0f"),
            _fmt(r.peak_mem_mb, ".0f"),
            _fmt(r.tokens_per_s, ".0f"),
            _fmt(r.final_loss, ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ns = {s: max((r.n.get(s, 0) for r in rows), default=0) for s in slugs}
    out = [
        "## Measured results",
        "",
        f"Produced by: `{command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. Test examples per task: "
        + ", ".join(f"{s} {ns[s]}" for s in slugs)
        + (f" (limit {limit})" if limit else "")
        + ".",
        "",
        *lines,
        "",
        "Train time is the wall time of `qmoe finetune` (model loading included); peak memory is the training "
        "process's peak (RSS on CPU, `max_memory_allocated` on CUDA); tokens/s is the median over logging steps. "
        "GSM8K answer NLL is the teacher-forced loss per answer token on the reference solutions of the GSM8K test "
        "problems above (the training objective on unseen problems; lower is better); final train loss is the LM "
        "loss of the last logged training step (a few batches, so noisy).",
        *paired_table(rows, slugs, ns, pairs),
    ]
    if specialisation:
        out += [
            "",
            "Expert specialisation (MoELoRA runs; top-1 routing at each layer's `mlp.down_proj`, teacher-forced "
            "over GSM8K test question+answer pairs, averaged over layers): numeric vs all TV is the total-variation "
            "distance between where numeric tokens and all tokens go (0 = numbers routed like any token); numeric "
            "top share is the share of numeric tokens taken by the busiest expert (1/E = even); load CV is the "
            "coefficient of variation of the expert load (0 = balanced).",
            "",
            "| run | numeric tokens | numeric vs all TV | numeric top share | load CV |",
            "|---|---|---|---|---|",
        ]
        for label, m in specialisation.items():
            out.append(
                f"| {label} | {m['numeric_tokens']} | {m['numeric_vs_all_tv']:.3f} | "
                f"{m['numeric_top_share']:.3f} (1/E = {1 / m['experts']:.3f}) | {m['load_cv']:.3f} |"
            )
    if figures:
        out += ["", "Figures:", ""]
        for fig in figures:
            rel = (
                Path(fig).resolve().relative_to(results_file.resolve().parent)
                if _inside(fig, results_file.parent)
                else fig
            )
            out.append(f"![{Path(fig).stem}]({rel})")
    return "\n".join(out) + "\n"


def paired_table(rows: list[RunResult], slugs: list[str], ns: dict[str, int], pairs=()) -> list[str]:
    """Every row against the first trained run, then the requested (run, reference) pairs, problem by problem
    (exact McNemar / sign test on accuracy; paired interval on the held-out answer loss)."""
    trained = [r for r in rows if r.recipe != "-" and r.error is None]
    if not trained or not any(ns.values()):
        return []
    ref = trained[0]
    by_label = {r.label: r for r in rows if not r.error}
    comparisons = [(r, ref) for r in rows if r is not ref and not r.error]
    comparisons += [(by_label[a], by_label[b]) for a, b in pairs if a in by_label and b in by_label]  # not failed
    widest = max(wilson_halfwidth(n // 2, n) for n in ns.values() if n) * 100
    head = [
        "run",
        "vs",
        *[f"Δ {s} (pts)" for s in slugs],
        "Δ pooled (pts)",
        "better / worse",
        "p (two-sided)",
        "Δ answer NLL (95%)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, other in comparisons:
        per_task = [paired_outcome(r.run_dir / f"eval-{s}.json", other.run_dir / f"eval-{s}.json") for s in slugs]
        if any(o is None for o in per_task):
            continue
        pooled = sum(per_task, PairedOutcome())
        nll = paired_nll_difference(r.heldout, other.heldout) if r.heldout and other.heldout else None
        lines.append(
            "| "
            + " | ".join(
                [
                    r.label,
                    other.label,
                    *[f"{o.delta:+.1f}" for o in per_task],
                    f"{pooled.delta:+.1f}",
                    f"{pooled.wins} / {pooled.losses}",
                    f"{pooled.p_value:.2f}",
                    f"{nll[0]:+.3f} ± {nll[1]:.3f}" if nll else "–",
                ]
            )
            + " |"
        )
    return [
        "",
        f"Paired comparisons on the same problems (every run against `{ref.label}`, then any `--pair`): Δ is the "
        f"accuracy difference in points; better / worse count the problems only the run / only the reference "
        f"solved; p is the exact two-sided sign test on those (McNemar), pooled over tasks. A single accuracy on "
        f"{max(ns.values())} problems has a 95% interval of up to ±{widest:.1f} points, so a difference with p above "
        f"0.05 is not evidence either way. Δ answer NLL is the run's held-out answer loss minus the reference's on "
        f"the same GSM8K problems, with a 95% interval over problems (negative = the run fits unseen solutions "
        f"better).",
        "",
        *lines,
    ]


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False
