"""Bring-your-own data: every format and offline source kind through ``datasets``, exact label masks of
multi-turn chats, truncation counted, the tokenisation cache reused (and never trusted half-written), and the
one-line messages of bad data. Small files written by the tests; the tiny chat model's real ChatML template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from pipeline_support import arithmetic_items, qmoe_cli, tiny_recipe, write_jsonl, write_recipe

from qmoe.data import DataError
from qmoe.dataprep import (
    COMPLETE,
    Encoder,
    data_preview,
    example_segments,
    prepare_training_data,
    render_segments,
    require_trainable,
)
from qmoe.recipe import DataSection, apply_overrides, load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test its own $QMOE_CACHE (the tokenisation cache and datasets' file cache live there)."""
    folder = tmp_path / "qmoe-cache"
    monkeypatch.setenv("QMOE_CACHE", str(folder))
    monkeypatch.delenv("QMOE_DATA_DIR", raising=False)
    return folder


@pytest.fixture(scope="module")
def tok(chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model_dir)


def prepare(tok, source, **fields):
    return prepare_training_data(DataSection(source=str(source), **{"max_length": 128, **fields}), tok)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100])


ALPACA = [
    {"instruction": "Add 3 and 5.", "input": "", "output": "3 + 5 = 8"},
    {"instruction": "Add these.", "input": "7 and 2", "output": "7 + 2 = 9"},
]


def single_turn_ids(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """The expected encoding of one prompt/answer pair, built from the ChatML text by hand."""
    context = ids(tok, f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    answer_ids = ids(tok, answer) + [tok.eos_token_id]
    return context + answer_ids, [-100] * len(context) + answer_ids


# ------------------------------------------------------------------------------------------- formats and sources


def test_alpaca_jsonl_is_detected_and_trains_on_the_output_only(tok, tmp_path):
    prepared = prepare(tok, write_jsonl(tmp_path / "alpaca.jsonl", ALPACA))
    assert "alpaca (detected" in prepared.report.format
    assert prepared.report.examples == 2
    for example, prompt, record in zip(
        prepared.dataset, ["Add 3 and 5.", "Add these.\n\n7 and 2"], ALPACA, strict=True
    ):
        assert (example["input_ids"], example["labels"]) == single_turn_ids(tok, prompt, record["output"])


def test_prompt_answer_csv_with_own_field_names(tok, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('q,a\n"Tom has 3 apples",#### 3\n"What is 2+2?",4\n', encoding="utf-8")
    prepared = prepare(tok, path, format="prompt-answer", prompt_field="q", answer_field="a")
    assert [trained_text(tok, e) for e in prepared.dataset] == ["#### 3<|im_end|>", "4<|im_end|>"]
    assert prepared.dataset[1]["input_ids"] == single_turn_ids(tok, "What is 2+2?", "4")[0]


def test_parquet_json_list_and_save_to_disk_give_the_same_examples(tok, tmp_path):
    from datasets import Dataset, DatasetDict

    table = Dataset.from_list(ALPACA)
    table.to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "a.json").write_text(json.dumps(ALPACA), encoding="utf-8")  # a JSON list (LLM-Adapters files)
    table.save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(ALPACA[:1]), "test": table}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "train.jsonl", ALPACA)
    expected = [
        single_turn_ids(tok, "Add 3 and 5.", "3 + 5 = 8"),
        single_turn_ids(tok, "Add these.\n\n7 and 2", "7 + 2 = 9"),
    ]
    for source, split in [
        ("a.parquet", "train"),
        ("a.json", "train"),
        ("saved", "train"),
        ("dict", "test"),
        ("folder", "train"),
    ]:
        prepared = prepare(tok, tmp_path / source, split=split)
        got = [(e["input_ids"], e["labels"]) for e in prepared.dataset]
        assert got == expected, source
    assert len(prepare(tok, tmp_path / "dict").dataset) == 1  # split train of the DatasetDict
    assert len(prepare(tok, tmp_path / "a.json", split="train[:1]").dataset) == 1


def test_gsm8k_layout_is_detected_and_drops_the_calculator_notes(tok, tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", arithmetic_items(3))
    prepared = prepare(tok, path)
    assert "gsm8k (detected" in prepared.report.format
    assert trained_text(tok, prepared.dataset[0]) == "He has 3 + 5 = 8 apples.\n#### 8<|im_end|>"


def test_legacy_task_and_path_keep_meaning_the_same_data(tmp_path):
    old = {"task": "gsm8k", "path": str(tmp_path / "train.jsonl"), "max_length": 64}
    assert DataSection(**old) == DataSection(source=str(tmp_path / "train.jsonl"), format="gsm8k", max_length=64)
    assert DataSection(task="jsonl", path="x.jsonl").format == "prompt-answer"
    assert DataSection(task="commonsense", path="c.json").format == "alpaca"
    base = {"adapter": {"method": "lora"}, "data": {"source": "gsm8k"}}
    assert validate_recipe(apply_overrides(base, ["data.path=/d/x.json"])).data.source == "/d/x.json"
    with pytest.raises(Exception, match="needs a file"):
        DataSection(task="commonsense")


def test_builtin_sources_found_in_the_data_dir(tok, tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "llm-adapters" / "ft-training_set").mkdir(parents=True)
    items = [
        {"instruction": "Which is bigger, 2 or 5?", "input": "", "output": "5 is bigger", "answer": "5"},
        {"instruction": "true or false: 1 < 2", "input": "", "output": "", "answer": "true"},
    ]
    (root / "llm-adapters" / "ft-training_set" / "math_10k.json").write_text(json.dumps(items))
    (root / "gsm8k").mkdir()
    write_jsonl(root / "gsm8k" / "train.jsonl", arithmetic_items(4))
    monkeypatch.setenv("QMOE_DATA_DIR", str(root))
    prepared = prepare(tok, "llm-adapters:math_10k")
    # no output: LLM-Adapters' own target, "the correct answer is <answer>"
    assert [trained_text(tok, e) for e in prepared.dataset] == [
        "5 is bigger<|im_end|>",
        "the correct answer is true<|im_end|>",
    ]
    assert DataSection(source="llm-adapters:math_10k").eval_task == "gsm8k"
    gsm = prepare(tok, "gsm8k", limit=2)
    assert gsm.report.examples == 2 and "GSM8K" in gsm.report.source
    assert trained_text(tok, gsm.dataset[0]).endswith("#### 8<|im_end|>")


# ------------------------------------------------------------------------------------------- multi-turn masks

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tom has 3 apples"},
    {"role": "assistant", "content": "He has 3."},
    {"role": "user", "content": "He buys 5 more. How many?"},
    {"role": "assistant", "content": "8 apples"},
]


def expected_chat_encoding(tok) -> tuple[list[int], list[int]]:
    """Every assistant turn (content + <|im_end|>) labelled, everything else -100; positions from the literal
    ChatML pieces."""
    c1 = ids(
        tok,
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nTom has 3 apples<|im_end|>\n<|im_start|>assistant\n",
    )
    a1 = ids(tok, "He has 3.") + [tok.eos_token_id]
    glue = ids(tok, "\n")  # ChatML's newline after <|im_end|>: template markup, not trained
    c2 = ids(tok, "<|im_start|>user\nHe buys 5 more. How many?<|im_end|>\n<|im_start|>assistant\n")
    a2 = ids(tok, "8 apples") + [tok.eos_token_id]
    input_ids = c1 + a1 + glue + c2 + a2
    labels = [-100] * len(c1) + a1 + [-100] * (len(glue) + len(c2)) + a2
    return input_ids, labels


def test_messages_train_on_every_assistant_turn_exactly(tok, tmp_path):
    prepared = prepare(tok, write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}]))
    assert "messages (detected" in prepared.report.format
    example = prepared.dataset[0]
    input_ids, labels = expected_chat_encoding(tok)
    assert example["input_ids"] == input_ids
    assert example["labels"] == labels
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert len(trained) == len(ids(tok, "He has 3.")) + len(ids(tok, "8 apples")) + 2
    segments = example_segments(tok, example["input_ids"], example["labels"])
    assert [t for t, on in segments if on] == ["He has 3.<|im_end|>", "8 apples<|im_end|>"]
    assert render_segments(segments).count("[[") == 2


def test_sharegpt_is_the_same_conversation(tok, tmp_path):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    record = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CHAT], "id": "x1"}
    prepared = prepare(tok, write_jsonl(tmp_path / "share.jsonl", [record]))
    assert "sharegpt (detected" in prepared.report.format
    assert (prepared.dataset[0]["input_ids"], prepared.dataset[0]["labels"]) == expected_chat_encoding(tok)


def test_system_prompt_is_added_to_conversations_without_one(tok, tmp_path):
    chat = CHAT[1:3]
    prepared = prepare(tok, write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}]), system_prompt="Be brief.")
    assert prepared.dataset[0]["input_ids"] == expected_chat_encoding(tok)[0][: len(prepared.dataset[0]["input_ids"])]


def test_truncation_inside_an_answer_is_counted_and_prompt_only_examples_dropped(tok, tmp_path):
    input_ids, labels = expected_chat_encoding(tok)
    cut = len(input_ids) - 2  # inside the second answer
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"messages": CHAT},
            {"messages": [{"role": "user", "content": "apples " * 200}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "nobody answers"}]},
        ],
    )
    prepared = prepare(tok, path, max_length=cut)
    report = prepared.report
    assert (report.records, report.examples, report.truncated) == (3, 1, 1)
    assert report.dropped == {f"prompt longer than max_length={cut}": 1, "no assistant turn": 1}
    assert prepared.dataset[0]["labels"] == labels[:cut] and report.longest > cut
    assert any("truncated inside an answer: 1" in line for line in report.lines())
    with pytest.raises(DataError, match="every example .* has its answer cut by data.max_length"):
        require_trainable(report)  # the only example left lost part of its answer: refuse, not train on it
    all_dropped = prepare(tok, path, max_length=16).report
    with pytest.raises(DataError, match="every example of .* was dropped"):
        require_trainable(all_dropped)


# ------------------------------------------------------------------------------------------- cache


def test_second_load_reuses_the_tokenisation(tok, tmp_path, cache):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 300)
    before = Encoder.batches_encoded
    first = prepare(tok, path)
    assert Encoder.batches_encoded > before and not first.report.cached
    assert (Path(first.report.cache) / COMPLETE).is_file() and Path(first.report.cache).is_relative_to(cache)
    encoded = Encoder.batches_encoded
    second = prepare(tok, path)
    assert Encoder.batches_encoded == encoded  # nothing re-tokenised
    assert second.report.cached and second.report.cache == first.report.cache
    assert second.dataset["input_ids"] == first.dataset["input_ids"]
    prepare(tok, path, max_length=64)  # another setting: another tokenisation
    assert Encoder.batches_encoded > encoded


def test_an_interrupted_tokenisation_is_never_trusted(tok, tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    folder = Path(prepare(tok, path).report.cache)
    (folder / COMPLETE).unlink()  # as if killed before the end: files there, no completion marker
    for arrow in folder.glob("*.arrow"):
        arrow.write_bytes(b"half-written")
    encoded = Encoder.batches_encoded
    again = prepare(tok, path)
    assert Encoder.batches_encoded > encoded and not again.report.cached
    assert [(e["input_ids"], e["labels"]) for e in again.dataset][0] == single_turn_ids(
        tok, "Add 3 and 5.", "3 + 5 = 8"
    )
    # bad data met mid-way leave no marker either
    bad = write_jsonl(tmp_path / "bad.jsonl", ALPACA * 200 + [{"instruction": "x", "input": "", "output": None}])
    with pytest.raises(DataError):
        prepare(tok, bad)
    assert len(list(folder.parent.glob(f"*/{COMPLETE}"))) == 1  # only the good file's tokenisation is complete


# ------------------------------------------------------------------------------------------- bad data


@pytest.mark.parametrize(
    "name, content, fields, message",
    [
        (
            "a.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": oops}\n',
            {},
            r"a.jsonl line 2: malformed JSON",
        ),
        (
            "a.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
            {},
            r"a.jsonl record 2: missing field 'output' \(fields: instruction\)",
        ),
        (
            "c.jsonl",
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}) + "\n",
            {},
            r"c.jsonl record 1: field 'messages\[1\]': unknown role 'bot'; valid: system, user",
        ),
        (
            "x.jsonl",
            '{"text": "a", "label": 1}\n',
            {},
            r"x.jsonl: cannot detect the format from its columns \(label, text\)",
        ),
        (
            "x.jsonl",
            '{"text": "a", "label": 1}\n',
            {"format": "alpaca"},
            r"x.jsonl record 1: missing field 'instruction' \(fields: text, label\), as in every record; format alpaca",
        ),
        ("e.jsonl", "\n", {}, r"e.jsonl is empty: no examples to train on"),
        ("a.txt", "hello", {}, r"a.txt: unknown data file type '.txt'; valid: .jsonl, .json, .parquet, .csv"),
    ],
)
def test_bad_data_gives_one_line_naming_file_record_and_field(tok, tmp_path, name, content, fields, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as error:
        prepared = prepare(tok, path, **fields)
        require_trainable(prepared.report)
    assert "\n" not in str(error.value)


def test_missing_sources_are_named(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("QMOE_SHARED", str(tmp_path))
    monkeypatch.setenv("QMOE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="data file not found"):
        prepare(tok, tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"folder holding train.jsonl"):
        prepare(tok, tmp_path)
    with pytest.raises(DataError, match=r"llm-adapters:no_such_set: no no_such_set.json"):
        prepare(tok, "llm-adapters:no_such_set")
    with pytest.raises(DataError, match="hub dataset could not be loaded"):
        prepare(tok, "nobody/no-such-dataset")  # HF_HUB_OFFLINE in the tests: fails at once


def test_builtin_sources_refuse_other_formats():
    with pytest.raises(Exception, match="does not apply to the builtin source gsm8k"):
        DataSection(source="gsm8k", format="sharegpt")


# ------------------------------------------------------------------------------------------- preview, CLI, UI


def data_recipe(chat_model_dir, tmp_path, source) -> dict:
    recipe = tiny_recipe(chat_model_dir, tmp_path, tmp_path / "run", method="lora")
    recipe["data"] = {"source": str(source), "max_length": 64}
    return recipe


def test_preview_is_what_the_ui_shows(chat_model_dir, tmp_path):
    from qmoe_app.data_preview import TRAINED, recipe_data_preview

    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    recipe = validate_recipe(data_recipe(chat_model_dir, tmp_path, source))
    preview = data_preview(recipe, show=1)
    assert len(preview.examples) == 1 and preview.report.examples == 2
    summary, runs = recipe_data_preview(recipe, show=2)
    assert "examples: 2 of 2 records" in summary
    assert [text for text, label in runs if label == TRAINED] == ["3 + 5 = 8<|im_end|>", "7 + 2 = 9<|im_end|>"]


@pytest.mark.slow
def test_qmoe_data_command_prints_counts_and_marked_examples(chat_model_dir, tmp_path):
    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    path = write_recipe(tmp_path / "r.yaml", data_recipe(chat_model_dir, tmp_path, source))
    result = qmoe_cli("data", path, "--show", "1", env={"QMOE_CACHE": str(tmp_path / "c")})
    assert result.returncode == 0, result.stderr
    assert "examples: 2 of 2 records" in result.stdout and "tokens per example: min" in result.stdout
    assert "[[3 + 5 = 8<|im_end|>]]" in result.stdout and "7 + 2" not in result.stdout  # --show 1; not a tty
    refused = qmoe_cli("data", path, "data.max_length=16", env={"QMOE_CACHE": str(tmp_path / "c")})
    assert refused.returncode == 2 and "every example of" in refused.stderr
    assert "dropped: 2 prompt longer than max_length=16" in refused.stdout


@pytest.mark.slow
def test_alpaca_recipe_trains_two_steps_on_a_small_file(chat_model_dir, tmp_path):
    from qmoe.pipeline import run_finetune

    source = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 4)
    recipe = load_recipe(
        REPO / "recipes" / "alpaca.yaml",
        [
            f"model.source={chat_model_dir}",
            "model.device=cpu",
            "model.compute_dtype=float32",
            f"data.source={source}",
            "adapter.num_experts=2",
            "adapter.r=2",
            "adapter.alpha=4",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.logging_steps=1",
            "eval.enabled=false",
        ],
    )
    assert recipe.data.format == "alpaca" and recipe.data.source == str(source)
    run = tmp_path / "run"
    assert run_finetune(recipe, run) == 0
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 2
    log = (run / "train.log").read_text()
    assert "examples: 8 of 8 records" in log and (run / "adapter").is_dir()
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["format"] == "alpaca"


@pytest.mark.slow
def test_train_tab_preview_data_endpoint(chat_model_dir, tmp_path, monkeypatch):
    """The Train tab's "Preview data" on the shipped alpaca recipe, its LLM-Adapters file found in
    $QMOE_DATA_DIR, with a local model chosen in the form."""
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    from qmoe_app.data_preview import TRAINED
    from qmoe_app.main import build_app
    from qmoe_app.recipe_form import FIELD_KEYS, recipe_form_values
    from qmoe_app.testing import serving

    data = tmp_path / "data" / "llm-adapters" / "ft-training_set"
    data.mkdir(parents=True)
    (data / "math_data.json").write_text(json.dumps([{**r, "answer": "8"} for r in ALPACA]))
    monkeypatch.setenv("QMOE_DATA_DIR", str(tmp_path / "data"))
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(chat_model_dir, models / "tiny")  # a real folder: the UI refuses symbolic links
    _, values = recipe_form_values("alpaca")
    values["model.source"] = "tiny"
    with serving(build_app(tmp_path / "runs", models)) as url:
        client = Client(url, verbose=False)
        message, summary, examples = client.predict(
            "alpaca", *[values[k] for k in FIELD_KEYS], api_name="/preview_data"
        )[:3]
    assert message.startswith("**OK:**"), message
    assert "examples: 2 of 2 records" in summary and "format alpaca" in summary
    trained = [item["token"] for item in examples if item["class_or_confidence"] == TRAINED]
    assert trained == ["3 + 5 = 8<|im_end|>", "7 + 2 = 9<|im_end|>"]
