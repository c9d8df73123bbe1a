"""The results of ``qmoe compare`` as text: one ``RunResult`` per row, the RESULTS.md tables (measured results,
paired comparisons, expert specialisation) and the generated block's markers, merged into hand-written text."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..rundir import eval_file_name
from .specialisation import MODULE
from .statistics import PairedOutcome, paired_nll_difference, paired_outcome, wilson_halfwidth

BEGIN, END = "<!-- qmoe compare: begin (generated) -->", "<!-- qmoe compare: end -->"


@dataclass
class RunResult:
    """What one row of the table measured: a trained run, or the base model (``recipe == "-"``)."""

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
    heldout: dict | None = None  # qmoe.compare.heldout.answer_nll on GSM8K test
    error: str | None = None

    def as_record(self) -> dict:
        """The row as written to results.json (JSON types; per-problem sums stay in the run's own file)."""
        d = dict(self.__dict__)
        d["run_dir"] = str(self.run_dir)
        if self.heldout:
            d["heldout"] = {k: v for k, v in self.heldout.items() if k != "per_example"}
        return d


def task_slug(task: str) -> str:
    """Short column name: a task name as is; for a file, its folder when it is called test.json(l)."""
    path = Path(task)
    if path.suffix not in (".json", ".jsonl"):
        return task
    return path.parent.name if path.stem == "test" else path.stem


def eval_file(run_dir: Path, slug: str) -> Path:
    """``eval-<slug>.json``: the run directory's ``eval.json`` for one test set (compare keeps one per task)."""
    return run_dir / eval_file_name(slug)


def merge_into(results_file: Path, table: str, begin: str = BEGIN, end: str = END) -> str:
    """The results file with the generated block (between the ``begin`` and ``end`` markers) replaced, keeping any
    hand-written text around it; appended when the file has no such block yet."""
    block = f"{begin}\n{table}{end}\n"
    if not results_file.is_file():
        return "# Results\n\n" + block
    text = results_file.read_text(encoding="utf-8")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + block


def _fmt(value: float | int | None, spec: str, empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def render_results(
    rows: list[RunResult],
    tasks: list[str],
    limit: int | None,
    command: str,
    figures: list[Path],
    results_file: Path,
    specialisation: dict[str, dict] | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    selection: str | None = None,
) -> str:
    """The generated block of RESULTS.md (without its markers); ``selection``: the --select-by section."""
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
        *([selection, ""] if selection else []),
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
            f"Expert specialisation (MoELoRA runs; top-1 routing at each layer's `{MODULE}`, teacher-forced "
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


def paired_table(
    rows: list[RunResult], slugs: list[str], ns: dict[str, int], pairs: Sequence[tuple[str, str]] = ()
) -> list[str]:
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
        per_task = [paired_outcome(eval_file(r.run_dir, s), eval_file(other.run_dir, s)) for s in slugs]
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
