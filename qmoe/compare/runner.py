"""Training and evaluating the runs of ``qmoe compare``, then writing what they measured.

Training and evaluation run as ``qmoe finetune`` / ``qmoe eval`` subprocesses, so each gets a clean process
(peak memory is per run) and a crash in one run is reported, not fatal. Everything is resumable: a finished
run (status.json ``finished`` + ``adapter/``) and an existing ``eval-<task>.json`` are reused, so re-running
the same command after an interruption only does what is missing.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..cli import qmoe_command
from ..errors import UsageError
from ..io import atomic_write_json, atomic_write_text, read_jsonl
from ..rundir import ADAPTER, CHECKPOINTS, METRICS, STATUS
from .report import RunResult, eval_file, merge_into, render_results, task_slug

# what compare adds to the run directories and to --out-dir
TRAIN_TIMING = "compare-train.json"  # wall time of the run's `qmoe finetune`
HELDOUT = "heldout-gsm8k.json"  # heldout.answer_nll of the run on GSM8K test
BASE_DIR = "base"  # the base model's row: its evaluations and held-out loss
LOGS_DIR = "logs"  # the subprocesses' output, one log per training / evaluation
RESULTS_JSON = "results.json"  # every row, as RunResult.as_record
SPECIALISATION_JSON = "specialisation.json"  # specialisation.summarise per MoELoRA run
SELECTION_MD = "selection.md"  # --select-by val_nll: every run's validation NLL and each group's selected run


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run a subprocess with its output teed into ``log``; (exit status, wall seconds)."""
    prefix = qmoe_command()
    shown = ["qmoe", *cmd[len(prefix) :]] if cmd[: len(prefix)] == prefix else cmd  # as a person would type it
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
        return json.loads((run_dir / STATUS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _finished(run_dir: Path) -> bool:
    return _status(run_dir).get("state") == "finished" and (run_dir / ADAPTER).is_dir()


def train(label: str, recipe: str, overrides: list[str], out_dir: Path) -> RunResult:
    """Train ``recipe`` into ``out_dir/label`` unless already finished (resuming from its checkpoints if any);
    the run's row, with ``error`` set when training failed."""
    run_dir = out_dir / label
    result = RunResult(label=label, recipe=recipe, run_dir=run_dir)
    timing = run_dir / TRAIN_TIMING
    if not _finished(run_dir):
        args = ["finetune", recipe, *overrides, "--output-dir", str(run_dir), "--no-eval"]
        args.append("--resume" if (run_dir / CHECKPOINTS).is_dir() else "--overwrite")
        code, seconds = _run(qmoe_command(*args), out_dir / LOGS_DIR / f"{label}-train.log")
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
    metrics = [m for m in read_jsonl(run_dir / METRICS) if m.get("loss") is not None]
    if metrics:
        result.peak_mem_mb = max(m.get("peak_mem_mb") or 0 for m in metrics) or None
        speeds = sorted(m["tokens_per_s"] for m in metrics if m.get("tokens_per_s"))
        result.tokens_per_s = speeds[len(speeds) // 2] if speeds else None
        result.final_loss = metrics[-1].get("lm_loss", metrics[-1]["loss"])
    return result


def evaluate(
    run_dir: Path, task: str, limit: int | None, out_file: Path, base_only: bool, log: Path, extra: list[str]
) -> tuple[float | None, int]:
    """(accuracy, examples scored) of ``qmoe eval`` on ``task``, reusing ``out_file`` when it exists;
    (None, 0) when the evaluation failed."""
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
    pairs: Sequence[tuple[str, str]] = (),
    select_last: int | None = None,
) -> int:
    """``runs``: (label, recipe path, run-specific overrides); ``overrides`` apply to every run; ``pairs``:
    extra (run, reference) label pairs for the paired table, beyond every run against the first.
    ``select_last``: choose by validation before any test set is touched: the last ``select_last`` records of
    the runs' (shared) training source are scored by answer NLL, and of runs labelled ``GROUP@VARIANT`` only each
    group's best goes on to evaluation (``selection.py``). Exit status: 0 when every run trained, else 1."""
    from ..recipe import load_recipe

    labels = [label for label, _, _ in runs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"run labels must be unique: {labels} (use --labels / --run LABEL ...)")
    for pair in pairs:
        unknown = [label for label in pair if label not in labels]
        if unknown:
            raise UsageError(f"--pair {' '.join(pair)}: no run labelled {unknown[0]!r}; runs: {', '.join(labels)}")
    # fail fast, before hours of training, on any bad recipe or override (and an impossible validation split)
    recipes = {label: load_recipe(recipe, [*overrides, *own]) for label, recipe, own in runs}
    validation = shared_validation_split(recipes, select_last) if select_last else None
    out_dir.mkdir(parents=True, exist_ok=True)

    results = [train(label, recipe, [*overrides, *own], out_dir) for label, recipe, own in runs]
    base = RunResult(label="base model", recipe="-", run_dir=out_dir / BASE_DIR)
    finished = [r for r in results if r.error is None]
    selection = None
    if validation is not None and finished:
        records, max_length = validation
        finished, selection = select_by_validation(finished, records, max_length, select_last, out_dir)
        chosen = {r.label for r in finished}
        dropped = [pair for pair in pairs if not set(pair) <= chosen]
        if dropped:
            print(f"--pair {', '.join(' '.join(p) for p in dropped)}: not both selected, left out", flush=True)
        pairs = [pair for pair in pairs if set(pair) <= chosen]
        results = [r for r in results if r.label in chosen or r.error]
    logs = out_dir / LOGS_DIR
    for task in tasks:
        slug = task_slug(task)
        if finished:
            acc, n = evaluate(
                finished[0].run_dir,
                task,
                limit,
                eval_file(base.run_dir, slug),
                True,
                logs / f"base-eval-{slug}.log",
                eval_args,
            )
            base.accuracy[slug], base.n[slug] = acc, n
        for r in finished:
            acc, n = evaluate(
                r.run_dir,
                task,
                limit,
                eval_file(r.run_dir, slug),
                False,
                logs / f"{r.label}-eval-{slug}.log",
                eval_args,
            )
            r.accuracy[slug], r.n[slug] = acc, n

    heldout_losses([base, *finished], finished, limit)

    figures, specialisation = [], {}
    if figures_dir is not None:
        figures, specialisation = write_figures(base, finished, [task_slug(t) for t in tasks], figures_dir)
        atomic_write_json(out_dir / SPECIALISATION_JSON, specialisation)
    atomic_write_json(out_dir / RESULTS_JSON, [r.as_record() for r in [base, *results]])
    table = render_results(
        [base, *results], tasks, limit, command, figures, results_file, specialisation, pairs, selection
    )
    atomic_write_text(results_file, merge_into(results_file, table))
    print(f"wrote {results_file}")
    return 0 if all(r.error is None for r in results) else 1


def shared_validation_split(recipes: dict, last: int) -> tuple[list[dict], int]:
    """(validation records, max_length) for ``--select-by val_nll``: every run must read the same training data
    (the same problems, rendered the same way) so that their validation NLLs pair problem by problem; only
    ``data.limit`` may differ, and none may reach into the last ``last`` records."""
    from .selection import validation_split

    sections = {label: r.data.model_dump(exclude={"limit"}) for label, r in recipes.items()}
    first_label, first = next(iter(sections.items()))
    for label, section in sections.items():
        differing = sorted(k for k in first if section[k] != first[k])
        if differing:
            raise UsageError(
                f"--select-by val_nll: runs {first_label!r} and {label!r} differ in data.{differing[0]} "
                f"({first[differing[0]]!r} vs {section[differing[0]]!r}); validation compares runs trained on the "
                "same data (only data.limit may differ)"
            )
    widest = max(recipes.values(), key=lambda r: r.data.limit or float("inf"))
    return validation_split(widest.data, last), widest.data.max_length


def select_by_validation(
    finished: list[RunResult], records: list[dict], max_length: int, last: int, out_dir: Path
) -> tuple[list[RunResult], str]:
    """(the selected runs, the selection section): each finished run's validation NLL (cached in its run
    directory), the best per ``GROUP@VARIANT`` group, and the table of every variant against its group's best."""
    from .selection import select_best, selection_table, validation_nll

    nll = {}
    for r in finished:
        print(f"validation answer loss: {r.label}", flush=True)
        nll[r.label] = validation_nll(r.run_dir, records, max_length=max_length, dequantize="auto")
    chosen = set(select_best(nll).values())
    section = (
        f"Selected by validation answer NLL on the last {last} records of the training data ({len(records)} scored; "
        "no run trains on them), before any test set was touched: of runs labelled GROUP@VARIANT only each "
        "group's best is evaluated below; Δ is each variant's paired difference from its group's best with a 95% "
        f"interval.\n\n{selection_table(nll)}"
    )
    atomic_write_text(out_dir / SELECTION_MD, section)
    print(section, flush=True)
    return [r for r in finished if r.label in chosen], section


def heldout_losses(rows: list[RunResult], finished: list[RunResult], limit: int | None) -> None:
    """Teacher-forced answer NLL on GSM8K test for every row (cached in the row's run directory)."""
    if not finished:
        return
    from ..chat import load_chat_model, resolve_adapter
    from ..data import load_gsm8k
    from .heldout import answer_nll

    records = None
    for r in rows:
        cache = r.run_dir / HELDOUT
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


def write_figures(
    base: RunResult, finished: list[RunResult], slugs: list[str], figures_dir: Path
) -> tuple[list[Path], dict[str, dict]]:
    """(PNG paths, ``{label: specialisation.summarise(...)}``): accuracy and training loss for every row, and the
    expert-specialisation figures when there are MoELoRA runs."""
    from .plots import accuracy_figure, expert_load_figure, loss_figure, routing_figure
    from .specialisation import measure_specialisation, summarise

    figures = [
        f
        for f in (
            accuracy_figure([base, *finished], slugs, figures_dir / "accuracy-per-task.png"),
            loss_figure(finished, figures_dir / "training-loss.png"),
        )
        if f is not None
    ]
    shares = measure_specialisation([r for r in finished if r.method == "moelora"])
    if not shares:
        return figures, {}
    figures += [
        routing_figure(shares, figures_dir / "numeric-token-routing.png"),
        expert_load_figure(shares, figures_dir / "expert-load-per-layer.png"),
    ]
    return figures, {label: summarise(s.numeric, s.everything, s.numeric_tokens) for label, s in shares.items()}
