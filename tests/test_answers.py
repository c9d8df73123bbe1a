"""Answer extraction and scoring, on real GSM8K / LLM-Adapters answers where the shared data is present."""

import json

import pytest

from qmoe.answers import extract_choice, extract_letter, extract_number, parse_number, score
from qmoe.data import gsm8k_record


def test_every_gsm8k_test_answer_extracts_to_its_final_number(shared_dir):
    lines = (shared_dir / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) > 1000
    for r in records:
        gold = r["answer"].rsplit("####", 1)[1].strip()
        assert extract_number(r["answer"]) == parse_number(gold), r["answer"]
        # the training target keeps the worked solution without calculator annotations
        item = gsm8k_record(r["question"], r["answer"])
        assert "<<" not in item["target"] and item["gold"] == gold
        assert score("numeric", item["target"], item["gold"])[1]


def test_gsm8k_answers_written_as_sentences_still_score(shared_dir):
    records = [json.loads(x) for x in (shared_dir / "data" / "gsm8k" / "test.jsonl").read_text().splitlines()[:200]]
    for r in records:
        gold = r["answer"].rsplit("####", 1)[1].strip()
        value = parse_number(gold)
        formatted = f"{value:,.2f}" if value != int(value) else f"{int(value):,}"
        assert score("numeric", f"Step by step... so the total is ${formatted}. The answer is ${formatted}.", gold)[1]
        assert not score("numeric", f"The answer is {value + 1:.2f}.", gold)[1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 1,234", 1234.0),
        ("The answer is $1,234.50.", 1234.5),
        ("so she pays $18.", 18.0),
        ("The answer is: -7", -7.0),
        ("It takes 2.5 hours, i.e. 150 minutes. The answer is 2.5", 2.5),
        ("The final answer is \\boxed{42}", 42.0),
        ("No numbers here", None),
        ("First 3 then 4 and finally 12", 12.0),
    ],
)
def test_number_extraction_formats(text, expected):
    assert extract_number(text) == expected


def test_multiple_choice_on_llm_adapters_outputs(shared_dir):
    for task in ("boolq", "piqa", "ARC-Easy", "winogrande", "social_i_qa", "openbookqa", "hellaswag", "ARC-Challenge"):
        path = shared_dir / "data" / "llm-adapters" / "dataset" / task / "test.json"
        if not path.is_file():
            continue
        for item in json.loads(path.read_text())[:50]:
            answer = item["answer"]
            assert extract_choice(f"the correct answer is {answer}") == answer.lower(), (task, item)
            assert score("choice", f"Hmm. The correct answer is {answer}.", answer)[1]
    aqua = shared_dir / "data" / "llm-adapters" / "dataset" / "AQuA" / "test.json"
    for item in json.loads(aqua.read_text())[:50]:
        assert score("letter", f"Therefore the answer is ({item['answer']}).", item["answer"])[1]
    assert extract_letter("The answer is (D).") == "D"


def test_llm_adapters_numeric_sets_score_their_gold(shared_dir):
    for task in ("SVAMP", "AddSub", "MultiArith", "SingleEq", "mawps"):
        for item in json.loads((shared_dir / "data" / "llm-adapters" / "dataset" / task / "test.json").read_text())[
            :30
        ]:
            assert score("numeric", f"The answer is {item['answer']}", str(item["answer"]))[1]
