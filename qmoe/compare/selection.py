"""Model selection on a validation split: runs are compared on held-out problems from the *training* file
(its last ``n`` problems, which no run trains on), so the test sets are touched once, by the selected runs.

Runs are labelled ``GROUP@VARIANT`` (e.g. ``moelora@lr3e-4``): :func:`select_best` picks, per group, the variant
with the lowest validation answer NLL (``qmoe.compare.heldout.answer_nll``: teacher-forced, answer tokens
only), and :func:`selection_table` reports every variant against its group's best with a paired 95% interval
(``statistics.paired_nll_difference``), so a "best" that is within noise of another variant says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..io import atomic_write_json
from .statistics import paired_nll_difference

if TYPE_CHECKING:
    from ..recipe import DataSection

VALIDATION_FILE = "validation-nll.json"  # in each run directory: answer_nll on the validation problems
TEST_FILE = "test-nll.json"  # and on the test problems, measured once the run has been selected


def group_of(label: str) -> str:
    """The group of a ``GROUP@VARIANT`` label (the whole label when it has no ``@``)."""
    return label.split("@", 1)[0]


def validation_split(data: DataSection, last: int) -> list[dict]:
    """The last ``last`` records of the training source ``data`` names (any single-turn format qmoe trains on),
    as ``{"prompt", "target", "system"}`` exactly as training renders them (prompt template, system prompt).
    Refuses when ``data.limit`` (the runs train on the first ``limit`` records; none = all) reaches into them."""
    from ..dataprep import Record, detect_layout, load_source, to_messages

    source = load_source(data.model_copy(update={"limit": None}))
    total = len(source.dataset)
    if last < 1 or last >= total:
        raise UsageError(f"validation: last={last} must be in [1, {total - 1}] for {source.where}")
    if (data.limit or total) > total - last:
        trained = f"first {data.limit}" if data.limit else f"all {total}"
        raise UsageError(
            f"validation: the runs train on the {trained} records of {source.where}, which reaches into its last "
            f"{last} (the validation split); set data.limit to at most {total - last}"
        )
    layout = source.layout or detect_layout(source.dataset, data, source.where)[0]
    records = []
    for index in range(total - last, total):
        messages = to_messages(Record(source.where, index, source.dataset[index]), layout, data)
        if isinstance(messages, str):  # a record training would skip ('empty answer'): not a validation problem
            continue
        turns = [m for m in messages if m["role"] != "system"]
        if [m["role"] for m in turns] != ["user", "assistant"]:
            raise UsageError(
                f"validation: {source.where} record {index + 1} is a {len(turns)}-turn conversation; validation by "
                "answer NLL takes single-turn records (one prompt, one answer)"
            )
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        records.append({"prompt": turns[0]["content"], "target": turns[1]["content"], "system": system})
    return records


def validation_records(train_file: str | Path, last: int, trained_on: int) -> list[dict]:
    """The last ``last`` GSM8K problems of ``train_file`` (:func:`validation_split` of a GSM8K-format file);
    refuses when the runs' first ``trained_on`` problems would reach into them."""
    from ..recipe import DataSection

    if not Path(train_file).is_file():
        raise UsageError(f"validation: {train_file} is not a file")
    return validation_split(DataSection(source=str(train_file), format="gsm8k", limit=trained_on or None), last)


def validation_nll(
    run_dir: Path, records: list[dict], max_length: int = 512, dequantize: str = "on", cache_file: str = VALIDATION_FILE
) -> dict:
    """answer_nll of the run's adapter on ``records``, cached in the run directory as ``cache_file`` (recomputed
    when the cached one was measured on other problems; TEST_FILE for the test problems). ``dequantize`` as
    ``qmoe eval --dequantize``: 'on' by default, since teacher forcing is all prefill, which runs faster on a
    dequantised copy on CPU (same numerics up to float rounding, tests/test_inference.py); on a GPU the copy is
    never made."""
    from ..chat import load_chat_model
    from .heldout import answer_nll

    cache = Path(run_dir) / cache_file
    key = {"problems": len(records), "first": records[0]["prompt"][:80], "max_length": max_length}
    key["dequantize"] = dequantize
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    chat = load_chat_model(run_dir, dequantize=dequantize)
    result = answer_nll(chat.model, chat.tokenizer, records, max_length=max_length)
    result["key"] = key
    atomic_write_json(cache, result)
    return result


def select_best(nll: dict[str, dict]) -> dict[str, str]:
    """``{group: label}`` of the lowest validation NLL in each group (``nll``: label -> answer_nll result)."""
    best: dict[str, str] = {}
    for label, result in nll.items():
        group = group_of(label)
        if group not in best or result["nll"] < nll[best[group]]["nll"]:
            best[group] = label
    return best


def selection_table(nll: dict[str, dict], extra: dict[str, dict] | None = None) -> str:
    """Markdown: every run's validation NLL, its difference from its group's best with a paired 95% interval,
    and which one was selected. ``extra``: more columns per label (column name -> value text)."""
    best = select_best(nll)
    columns = list(next(iter((extra or {}).values()), {}))
    head = "| run | validation NLL | Δ vs group's best (95% CI) | selected |" + "".join(f" {c} |" for c in columns)
    lines = [head, "|" + "---|" * (4 + len(columns))]
    for label in sorted(nll, key=lambda lab: (group_of(lab), lab)):
        chosen = best[group_of(label)]
        if label == chosen:
            delta = "—"
        else:
            diff = paired_nll_difference(nll[label], nll[chosen])
            delta = "n/a" if diff is None else f"{diff[0]:+.4f} (±{diff[1]:.4f})"
        cells = "".join(f" {(extra or {}).get(label, {}).get(c, '')} |" for c in columns)
        mark = "**yes**" if label == chosen else ""
        lines.append(f"| {label} | {nll[label]['nll']:.4f} | {delta} | {mark} |" + cells)
    return "\n".join(lines) + "\n"
