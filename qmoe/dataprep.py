"""Training data through ``datasets``: where they come from, what layout they have, and their tokenisation
(cached under ``$QMOE_CACHE/data``, so a large set is tokenised once and reused by later runs and ``--resume``).

``data.source`` names a builtin set (``gsm8k``, ``llm-adapters:<name>``), a local file (.jsonl/.json/.parquet/
.csv), a folder (``save_to_disk`` output, or one holding ``<split>.jsonl``) or a hub dataset id. ``data.format``
says how a record becomes a conversation (:data:`qmoe.recipe.DATA_FORMATS`; ``auto`` detects it from the
columns and logs what it chose). Every conversation goes through the model's own chat template and trains on
its assistant turns only (:func:`qmoe.data.chat_segments`); truncation that cuts an answer is counted.

:func:`prepare_training_data` returns the tokenised set with a :class:`DataReport`; :func:`data_preview` is what
``qmoe data`` and the UI's Train tab show.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import DataError, TemplateError, chat_segments, encode_segments, gsm8k_record, llm_adapters_train_path
from .io import atomic_write_json

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from .recipe import DataSection, Recipe

log = logging.getLogger("qmoe")

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# bump when the encoding changes: cached tokenisations of an older version are then never reused
ENCODING_VERSION = 1
COMPLETE = "complete.json"  # written last (atomically): a cache folder without it is an interrupted run's
AUTO_NUM_PROC_FROM = 20_000  # smaller sets tokenise faster in-process than the worker start-up costs
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
}


def cache_root() -> Path:
    from .models import cache_dir

    return cache_dir() / "data"


# ------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    dataset: Dataset
    where: str  # named in every message about a record: the file, folder, hub id or builtin
    layout: Layout | None = None  # fixed by a builtin source; None = from data.format
    how: str = ""  # the builtin's format, for the log


@dataclass(frozen=True)
class Layout:
    """Which columns make the conversation: the resolved ``data.format`` and its field names."""

    format: str
    prompt: str = "question"
    answer: str = "answer"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    answer_fallback: bool = False  # LLM-Adapters: no output -> "the correct answer is <answer>"


def _first_line(exc: BaseException) -> str:
    while exc.__cause__ is not None and not str(exc).strip():
        exc = exc.__cause__
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _read_file(path: Path, split: str) -> Dataset:
    from datasets import load_dataset

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown data file type {path.suffix!r}; valid: {', '.join(FILE_BUILDERS)}")
    if split != "train" and not split.startswith("train["):
        raise DataError(f"data.split={split!r}: a single file has only the split 'train' (train[:N] slices it)")
    if not path.read_bytes()[:4096].strip() and not path.read_text(errors="replace").strip():
        raise DataError(f"{path} is empty: no examples to train on")
    try:
        return load_dataset(builder, data_files=str(path), split=split, cache_dir=str(cache_root() / "files"))
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow errors name neither the line nor the record
        if builder == "json":
            from .data import read_records

            read_records(path)  # raises the precise one-line error (file and line) for malformed JSON
        raise DataError(f"{path}: cannot read it as {builder} ({_first_line(exc)})") from None


def _read_folder(path: Path, split: str) -> Dataset:
    from datasets import DatasetDict, load_from_disk

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            loaded = load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path}: cannot load this save_to_disk folder ({_first_line(exc)})") from None
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise DataError(f"{path}: no split {split!r} (data.split); it has: {', '.join(loaded)}")
            return loaded[split]
        return loaded
    for suffix in FILE_BUILDERS:
        if (path / f"{split}{suffix}").is_file():
            return _read_file(path / f"{split}{suffix}", "train")
    raise DataError(
        f"{path}: neither a datasets save_to_disk folder nor a folder holding {split}.jsonl/.json/.parquet/.csv"
    )


def _read_hub(data: DataSection) -> Dataset:
    from datasets import load_dataset

    try:
        return load_dataset(data.source, data.subset, split=data.split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated, bad split: all one line for the user
        raise DataError(
            f"data.source {data.source!r} is not gsm8k, llm-adapters:<name>, an existing file or folder, and "
            f"the hub dataset could not be loaded ({_first_line(exc)})"
        ) from None


def load_source(data: DataSection) -> Source:
    """The raw records ``data.source`` names, as a ``datasets.Dataset`` (``data.limit`` applied)."""
    from datasets import Dataset

    source = data.source
    layout, how = None, ""
    if source == "gsm8k":
        from .data import load_gsm8k

        records = load_gsm8k("train", None, data.limit)  # $QMOE_DATA_DIR, the hub, then the packaged set
        ds = Dataset.from_list([{"prompt": r["prompt"], "target": r["target"]} for r in records])
        where, layout = "GSM8K (builtin)", Layout("prompt-answer", prompt="prompt", answer="target")
        how = "format gsm8k (builtin)"
    elif source.startswith("llm-adapters:"):
        name = source.split(":", 1)[1]
        path = llm_adapters_train_path(name)
        if path is None:
            raise DataError(
                f"data.source {source}: no {name}.json (ft-training_set) or {name}/train.json (dataset) under "
                "$QMOE_DATA_DIR, $QMOE_SHARED/data or ../shared/data; download it from LLM-Adapters or give its path"
            )
        ds, where = _read_file(path, data.split), str(path)
        layout, how = Layout("alpaca", answer_fallback=True), "format alpaca (builtin llm-adapters)"
    else:
        path = Path(source).expanduser()
        if path.is_file():
            ds, where = _read_file(path, data.split), str(path)
        elif path.is_dir():
            ds, where = _read_folder(path, data.split), str(path)
        elif path.suffix.lower() in FILE_BUILDERS or source.startswith((".", "/", "~")):
            raise DataError(f"data file not found: {path}")
        else:
            ds, where = _read_hub(data), f"{source} (hub{', ' + data.subset if data.subset else ''}, {data.split})"
    if data.limit and len(ds) > data.limit:
        ds = ds.select(range(data.limit))
    return Source(ds, where, layout, how)


# ------------------------------------------------------------------------------------------- formats


def _first_value(ds: Dataset, column: str) -> Any:
    for value in ds.select(range(min(len(ds), 20)))[column]:
        if value is not None:
            return value
    return None


def _turn_keys(ds: Dataset, column: str) -> set[str]:
    turns = _first_value(ds, column)
    if isinstance(turns, str):
        turns = _parse_turns(turns)
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        return {k for k, v in turns[0].items() if v is not None}
    return set()


def detect_layout(ds: Dataset, data: DataSection, where: str) -> tuple[Layout, str]:
    """(layout, why): ``data.format``, or for ``auto`` the first layout whose columns the records have."""
    columns = set(ds.column_names)
    fields = dict(
        prompt=data.prompt_field,
        answer=data.answer_field,
        instruction=data.instruction_field,
        input=data.input_field,
        output=data.output_field,
    )
    if data.format != "auto":
        default_turns = "conversations" if data.format == "sharegpt" else "messages"
        layout = Layout(data.format, messages=data.messages_field or default_turns, **fields)
        return layout, f"format {data.format} (data.format)"
    for column in [data.messages_field] if data.messages_field else ["conversations", "messages"]:
        if column in columns:
            keys = _turn_keys(ds, column)
            kind = "sharegpt" if {"from", "value"} <= keys else "messages"
            return Layout(kind, messages=column, **fields), f"format {kind} (detected: column {column!r})"
    if {data.instruction_field, data.output_field} <= columns:
        return Layout("alpaca", **fields), (
            f"format alpaca (detected: columns {data.instruction_field!r}, {data.output_field!r})"
        )
    if {data.prompt_field, data.answer_field} <= columns:
        first = _first_value(ds, data.answer_field)
        if (data.prompt_field, data.answer_field) == ("question", "answer") and "####" in str(first):
            return Layout("gsm8k", **fields), "format gsm8k (detected: question/answer with '#### N' answers)"
        return Layout("prompt-answer", **fields), (
            f"format prompt-answer (detected: columns {data.prompt_field!r}, {data.answer_field!r})"
        )
    for prompt, answer in (("prompt", "completion"), ("prompt", "response"), ("prompt", "answer")):
        if {prompt, answer} <= columns:
            layout = Layout("prompt-answer", **{**fields, "prompt": prompt, "answer": answer})
            return layout, f"format prompt-answer (detected: columns {prompt!r}, {answer!r})"
    raise DataError(
        f"{where}: cannot detect the format from its columns ({', '.join(sorted(columns))}); set data.format "
        "(alpaca: instruction/input/output, sharegpt: conversations of from/value, messages: role/content, "
        "prompt-answer: data.prompt_field/data.answer_field)"
    )


def check_columns(ds: Dataset, layout: Layout, where: str) -> None:
    """A required column absent from every record: one line naming it, the format and the columns there are."""
    need = {
        "prompt-answer": [layout.prompt, layout.answer],
        "gsm8k": [layout.prompt, layout.answer],
        "alpaca": [layout.instruction] + ([] if layout.answer_fallback else [layout.output]),
        "sharegpt": [layout.messages],
        "messages": [layout.messages],
    }[layout.format]
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        option = {"sharegpt": "messages_field", "messages": "messages_field", "alpaca": "instruction_field"}
        hint = f"data.{option.get(layout.format, 'prompt_field')}"
        raise DataError(
            f"{where} record 1: missing field {missing[0]!r} (fields: {', '.join(ds.column_names)}), as in every "
            f"record; format {layout.format} needs it: name the right field with {hint} and its siblings, or set "
            "data.format"
        )


def _parse_turns(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


class Record:
    """One row of a source, for the error messages: file, record number (1-based) and field (to_messages reads
    it; qmoe.compare builds its validation split from it)."""

    def __init__(self, where: str, index: int, row: dict):
        self.where, self.index, self.row = where, index, row

    def fail(self, field_name: str, problem: str) -> DataError:
        return DataError(f"{self.where} record {self.index + 1}: field '{field_name}': {problem}")

    def missing(self, field_name: str) -> DataError:
        present = ", ".join(k for k, v in self.row.items() if v is not None)
        return DataError(f"{self.where} record {self.index + 1}: missing field '{field_name}' (fields: {present})")

    def text(self, field_name: str, required: bool = True) -> str | None:
        value = self.row.get(field_name)
        if value is None:
            if not required:
                return None
            raise self.missing(field_name)
        if isinstance(value, (dict, list)):
            raise self.fail(field_name, f"expected text, got {type(value).__name__}")
        return str(value)


def to_messages(record: Record, layout: Layout, data: DataSection) -> list[dict] | str:
    """The record as chat messages (the recipe's system prompt and prompt template applied), or the reason it is
    skipped ('empty answer')."""
    if layout.format in ("sharegpt", "messages"):
        return _conversation(record, layout, data)
    if layout.format == "alpaca":
        instruction = record.text(layout.instruction).strip()
        extra = (record.text(layout.input, required=False) or "").strip()
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        answer = record.text(layout.output, required=not layout.answer_fallback)
        if not (answer or "").strip() and layout.answer_fallback:
            answer = f"the correct answer is {record.text('answer').strip()}"
    else:
        prompt = record.text(layout.prompt).strip()
        answer = record.text(layout.answer)
        if layout.format == "gsm8k":
            answer = gsm8k_record(prompt, answer)["target"]
    answer = answer.strip()
    if not answer:
        return "empty answer"
    from .data import single_turn

    return single_turn(data.prompt_template.replace("{prompt}", prompt), answer, data.system_prompt)


def _conversation(record: Record, layout: Layout, data: DataSection) -> list[dict] | str:
    name = layout.messages
    turns = record.row.get(name)
    if isinstance(turns, str):
        turns = _parse_turns(turns)
    if turns is None:
        raise record.missing(name)
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise record.fail(
            name, "expected a list of turns ({'role': ..., 'content': ...} or {'from': ..., 'value': ...})"
        )
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if role not in ROLES:
            raise record.fail(f"{name}[{i}]", f"unknown role {role!r}; valid: {', '.join(ROLES)}")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        if content is None or isinstance(content, dict):
            raise record.fail(f"{name}[{i}]", "turn without text content")
        messages.append({"role": ROLES[role], "content": str(content)})
    if data.system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": data.system_prompt})
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    return messages


class Encoder:
    """The ``datasets.map`` function: a batch of records -> input_ids, labels and the per-example counts.

    Bad data raise :class:`DataError` naming the file, record and field; a record that cannot train (empty
    answer, no assistant turn, prompt longer than max_length) is marked ``dropped`` with the reason.
    """

    batches_encoded = 0  # in this process, all instances: a load served from the cache encodes none

    def __init__(self, tokenizer: PreTrainedTokenizerBase, layout: Layout, data: DataSection, where: str):
        self.tokenizer, self.layout, self.data, self.where = tokenizer, layout, data, where

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        Encoder.batches_encoded += 1
        columns = list(batch)
        conversations, skipped = [], {}
        for k, index in enumerate(indices):
            record = Record(self.where, index, {c: batch[c][k] for c in columns})
            messages = to_messages(record, self.layout, self.data)
            if isinstance(messages, str):
                skipped[k] = messages
                conversations.append([])
                continue
            try:
                conversations.append(chat_segments(self.tokenizer, messages))
            except TemplateError as exc:
                raise DataError(f"{self.where} record {index + 1}: {exc}") from None
        encoded = encode_segments(self.tokenizer, conversations, self.data.max_length)
        for k, reason in skipped.items():
            encoded[k]["dropped"] = reason
        return {key: [e[key] for e in encoded] for key in ("input_ids", "labels", "n_tokens", "truncated", "dropped")}


# ------------------------------------------------------------------------------------------- report


@dataclass
class DataReport:
    source: str
    format: str  # e.g. "format alpaca (detected: columns 'instruction', 'output')"
    records: int  # in the source (after data.limit)
    examples: int  # kept for training
    max_length: int
    tokens_min: int = 0
    tokens_median: float = 0
    tokens_max: int = 0
    longest: int = 0  # tokens of the longest example before truncation
    truncated: int = 0  # kept examples whose answer truncation cut
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    cached: bool = False
    cache: str = ""

    def lines(self) -> list[str]:
        out = [
            f"source: {self.source}, {self.format}",
            f"examples: {self.examples} of {self.records} records",
        ]
        if self.examples:
            out.append(
                f"tokens per example: min {self.tokens_min}, median {self.tokens_median:g}, max {self.tokens_max} "
                f"(max_length {self.max_length}; longest before truncation {self.longest})"
            )
        out.append(
            f"truncated inside an answer: {self.truncated} (kept; the answer is cut at max_length={self.max_length})"
            if self.truncated
            else "truncated inside an answer: 0"
        )
        if self.dropped:
            out.append("dropped: " + "; ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())))
        else:
            out.append("dropped: 0")
        out.append(f"tokenisation: {'reused from the cache' if self.cached else 'computed and cached'} ({self.cache})")
        return out


def require_trainable(report: DataReport) -> None:
    """Refuse to train on an empty set, on one where every example was dropped, or where every answer is cut."""
    if report.records == 0:
        raise DataError(f"{report.source} is empty: no examples to train on")
    if report.examples == 0:
        reasons = "; ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items()))
        raise DataError(
            f"every example of {report.source} was dropped ({reasons}); raise data.max_length or fix the data"
        )
    if report.truncated == report.examples:
        raise DataError(
            f"every example of {report.source} has its answer cut by data.max_length={report.max_length} "
            f"(longest: {report.longest} tokens); raise data.max_length"
        )


@dataclass
class PreparedData:
    dataset: Dataset  # input_ids and labels of the kept examples
    report: DataReport


# ------------------------------------------------------------------------------------------- tokenisation


def tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> str:
    """What the tokenisation depends on: the vocabulary and merges, the chat template, the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, vocab, str(tokenizer.chat_template), str(tokenizer.all_special_tokens)]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def _fingerprint(ds: Dataset, layout: Layout, data: DataSection, tokenizer: PreTrainedTokenizerBase) -> str:
    settings = {
        "version": ENCODING_VERSION,
        "source": ds._fingerprint,  # datasets' own: changes with the file's contents (path, size, mtime)
        "rows": len(ds),
        "layout": asdict(layout),
        "template": data.prompt_template,
        "system": data.system_prompt,
        "max_length": data.max_length,
        "tokenizer": tokenizer_key(tokenizer),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def _num_proc(data: DataSection, n: int) -> int | None:
    if data.num_proc is not None:
        return data.num_proc if data.num_proc > 1 else None
    if n < AUTO_NUM_PROC_FROM:
        return None
    return max(1, min(8, os.cpu_count() or 1)) if (os.cpu_count() or 1) > 1 else None


def prepare_training_data(
    data: DataSection, tokenizer: PreTrainedTokenizerBase, *, cache: Path | None = None
) -> PreparedData:
    """Load, convert and tokenise ``data`` (or reuse an earlier run's tokenisation of the same inputs).

    The tokenised set lives in ``<cache>/<fingerprint>/`` with ``complete.json`` written last: a folder without
    it (a run killed mid-way) is deleted and redone, never trusted. A file lock keeps two runs preparing the
    same data from writing into each other.
    """
    from datasets import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled
    from filelock import FileLock

    source = load_source(data)
    ds = source.dataset
    layout, how = source.layout, source.how
    if layout is None:
        layout, how = detect_layout(ds, data, source.where)
    if len(ds):
        check_columns(ds, layout, source.where)
    log.info("data: %s, %s, %d records", source.where, how, len(ds))
    if layout.format in ("sharegpt", "messages") and data.prompt_template != "{prompt}":
        log.info(
            "data: prompt_template applies to single-turn formats; the %s user turns are kept as written", layout.format
        )

    root = Path(cache) if cache is not None else cache_root()
    fingerprint = _fingerprint(ds, layout, data, tokenizer)
    folder = root / fingerprint
    root.mkdir(parents=True, exist_ok=True)
    bars = is_progress_bar_enabled()
    if len(ds) < 10_000:
        disable_progress_bars()  # a bar per small map is noise in train.log
    try:
        with FileLock(str(root / f"{fingerprint}.lock")):
            cached = (folder / COMPLETE).is_file()
            if not cached and folder.exists():
                shutil.rmtree(folder)  # an interrupted run's files: incomplete by definition
            encoder = Encoder(tokenizer, layout, data, source.where)
            encoded = ds.map(
                encoder,
                batched=True,
                batch_size=256,
                with_indices=True,
                remove_columns=ds.column_names,
                num_proc=_num_proc(data, len(ds)),
                cache_file_name=str(folder / "encoded.arrow"),
                load_from_cache_file=cached,
                new_fingerprint=fingerprint,
                desc="tokenising",
            )
            report = _report(encoded, source.where, how, len(ds), data.max_length, cached, folder)
            if not cached:
                atomic_write_json(folder / COMPLETE, {"version": ENCODING_VERSION, "report": asdict(report)})
    finally:
        if bars:
            enable_progress_bars()
    kept = [i for i, reason in enumerate(encoded["dropped"]) if not reason]
    train = encoded if len(kept) == len(encoded) else encoded.select(kept)
    return PreparedData(train.select_columns(["input_ids", "labels"]), report)


def _report(encoded: Dataset, where: str, how: str, records: int, max_length: int, cached: bool, folder: Path):
    import pyarrow.compute as pc

    table = encoded.data
    dropped = table.column("dropped").to_pylist()
    keep = [not reason for reason in dropped]
    all_lengths = pc.list_value_length(table.column("input_ids")).to_pylist()
    lengths = [n for n, k in zip(all_lengths, keep, strict=True) if k]
    truncated = sum(t for t, k in zip(table.column("truncated").to_pylist(), keep, strict=True) if k)
    n_tokens = table.column("n_tokens").to_pylist()
    return DataReport(
        source=where,
        format=how,
        records=records,
        examples=len(lengths),
        max_length=max_length,
        tokens_min=min(lengths, default=0),
        tokens_median=statistics.median(lengths) if lengths else 0,
        tokens_max=max(lengths, default=0),
        longest=max(n_tokens, default=0),
        truncated=int(truncated),
        dropped=dict(Counter(reason for reason in dropped if reason)),
        cached=cached,
        cache=str(folder),
    )


# ------------------------------------------------------------------------------------------- preview


def example_segments(
    tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int]
) -> list[tuple[str, bool]]:
    """An example's text in (text, trained) runs: consecutive tokens with and without a label, decoded."""
    runs: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != -100) != (labels[start] != -100):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            runs.append((text, labels[start] != -100))
            start = i
    return runs


def render_segments(segments: list[tuple[str, bool]], style: str = "plain") -> str:
    """Trained-on text marked: ``[[...]]`` in plain text, bold green in rich markup."""
    if style == "rich":
        from rich.markup import escape

        return "".join(f"[bold green]{escape(t)}[/]" if trained else escape(t) for t, trained in segments)
    return "".join(f"[[{t}]]" if trained else t for t, trained in segments)


@dataclass
class DataPreview:
    report: DataReport
    examples: list[list[tuple[str, bool]]]  # the first N kept examples as (text, trained) runs


def load_data_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The tokenizer (and chat template) of the recipe's model, without loading the model."""
    from .models import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source(recipe.model.source))


def data_preview(recipe: Recipe, show: int = 3, tokenizer: PreTrainedTokenizerBase | None = None) -> DataPreview:
    """What ``qmoe data`` prints and the Train tab shows: the report and the first ``show`` examples."""
    tokenizer = tokenizer or load_data_tokenizer(recipe)
    prepared = prepare_training_data(recipe.data, tokenizer)
    rows = prepared.dataset.select(range(min(show, len(prepared.dataset))))
    examples = [example_segments(tokenizer, r["input_ids"], r["labels"]) for r in rows]
    return DataPreview(prepared.report, examples)
