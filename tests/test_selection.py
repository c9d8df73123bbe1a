"""Model selection on a validation split (issue 21): the last problems of the training file, best variant per
GROUP@VARIANT group by validation NLL, every variant against its group's best with a paired interval."""

import json

import pytest
import torch
from pipeline_support import build_tiny_chat_model

import qmoe
from qmoe.compare.selection import (
    VALIDATION_FILE,
    group_of,
    select_best,
    selection_table,
    validation_nll,
    validation_records,
)
from qmoe.errors import UsageError


def nll(per_example):
    tokens = sum(n for _, n in per_example)
    return {"nll": sum(s for s, _ in per_example) / tokens, "tokens": tokens, "per_example": per_example}


def gsm8k_file(tmp_path, n):
    path = tmp_path / "train.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_groups_and_the_best_variant_of_each():
    results = {
        "lora@lr1e-4": nll([[12.0, 10], [22.0, 10]]),
        "lora@lr3e-4": nll([[10.0, 10], [20.0, 10]]),
        "moelora@lr1e-4": nll([[9.0, 10], [21.0, 10]]),
        "plain": nll([[30.0, 10], [30.0, 10]]),
    }
    assert group_of("moelora-no-contrastive@lr3e-4") == "moelora-no-contrastive" and group_of("plain") == "plain"
    assert select_best(results) == {"lora": "lora@lr3e-4", "moelora": "moelora@lr1e-4", "plain": "plain"}


def test_the_table_gives_each_variant_its_difference_from_the_groups_best():
    results = {
        "lora@lr1e-4": nll([[12.0, 10], [22.0, 10], [31.0, 10]]),  # 65 / 30 tokens
        "lora@lr3e-4": nll([[10.0, 10], [20.0, 10], [30.0, 10]]),  # 60 / 30: the best
    }
    table = selection_table(results, {"lora@lr1e-4": {"steps": "50"}, "lora@lr3e-4": {"steps": "50"}})
    lines = table.splitlines()
    assert lines[0] == "| run | validation NLL | Δ vs group's best (95% CI) | selected | steps |"
    assert lines[2].startswith("| lora@lr1e-4 | 2.1667 | +0.1667 (±") and lines[2].endswith("|  | 50 |")
    assert lines[3] == "| lora@lr3e-4 | 2.0000 | — | **yes** | 50 |"


def test_validation_is_the_end_of_the_training_file_and_never_trained_on(tmp_path):
    path = gsm8k_file(tmp_path, 30)
    records = validation_records(path, 10, trained_on=20)
    assert [r["prompt"] for r in records] == [f"What is {i} + 1?" for i in range(20, 30)]
    assert records[0]["target"].endswith("#### 21") and records[0]["system"] is None
    with pytest.raises(UsageError, match="train on the first 21 records of .* set data.limit to at most 20"):
        validation_records(path, 10, trained_on=21)
    with pytest.raises(UsageError, match=r"last=30 must be in \[1, 29\]"):
        validation_records(path, 30, trained_on=0)
    with pytest.raises(UsageError, match="is not a file"):
        validation_records(tmp_path / "missing.jsonl", 10, trained_on=0)


def test_the_validation_split_of_any_single_turn_source_is_rendered_as_training_renders_it(tmp_path):
    from qmoe.compare.selection import validation_split
    from qmoe.recipe import DataSection

    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(8)]))
    data = DataSection(source=str(path), limit=5, prompt_template="Q: {prompt}", system_prompt="Be brief.")
    records = validation_split(data, 3)
    assert records == [{"prompt": f"Q: say {i}", "target": str(i), "system": "Be brief."} for i in (5, 6, 7)]
    with pytest.raises(UsageError, match="train on the all 8 records .* set data.limit to at most 5"):
        validation_split(DataSection(source=str(path)), 3)  # no limit: every record is trained on
    chats = tmp_path / "chats.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chats.write_text("".join(json.dumps({"messages": turns * (1 + (i == 1))}) + "\n" for i in range(4)))
    assert len(validation_split(DataSection(source=str(chats), limit=1), 2)) == 2
    with pytest.raises(UsageError, match="record 2 is a 4-turn conversation; .* single-turn records"):
        validation_split(DataSection(source=str(chats), limit=1), 3)


def test_validation_nll_of_an_adapter_is_cached_per_problem_set(tmp_path):
    from qmoe.compare.heldout import answer_nll
    from qmoe.models import load_base_model
    from qmoe.serialization import save_adapter

    model_dir = build_tiny_chat_model(tmp_path / "model")
    model, tokenizer, _ = load_base_model(str(model_dir), "nf4", "auto", "cpu")
    model = qmoe.attach(model, qmoe.AdapterConfig(method="moelora", num_experts=4, r=2, dropout=0.0))
    with torch.no_grad():
        for layer in qmoe.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    adapter = save_adapter(model, tmp_path / "adapter")
    records = validation_records(gsm8k_file(tmp_path, 12), 4, trained_on=8)
    first = validation_nll(adapter, records, max_length=128, dequantize="off")
    expected = answer_nll(model.eval(), tokenizer, records, max_length=128)
    assert first["nll"] == pytest.approx(expected["nll"], rel=1e-4) and first["tokens"] == expected["tokens"]
    cache = adapter / VALIDATION_FILE
    stamp = cache.stat().st_mtime_ns
    assert validation_nll(adapter, records, max_length=128, dequantize="off")["nll"] == first["nll"]
    assert cache.stat().st_mtime_ns == stamp  # reused
    other = validation_nll(adapter, records[:2], max_length=128, dequantize="off")
    assert other["tokens"] < first["tokens"] and cache.stat().st_mtime_ns != stamp  # other problems: measured


def test_the_interval_of_one_runs_nll_treats_problems_as_the_unit():
    from qmoe.compare.statistics import nll_halfwidth

    # per-problem NLL sums 10, 20, 30 over 10 tokens each: mean 2.0, residuals -10, 0, 10 (variance 100)
    assert nll_halfwidth(nll([[10.0, 10], [20.0, 10], [30.0, 10]])) == pytest.approx(1.96 * (3 * 100) ** 0.5 / 30)
    assert nll_halfwidth(nll([[5.0, 10], [10.0, 20]])) == 0.0  # every problem at the mean
