"""Task-mixture measurements (qmoe.compare.mixture) on a real tiny model with real NF4 layers."""

from __future__ import annotations

import pytest
import torch
from pipeline_support import build_tiny_chat_model

import qmoe
from qmoe.compare.mixture import (
    _candidates,
    answer_choices,
    choice_accuracy,
    choice_logprobs_reference,
    task_routing,
    task_specialisation,
)
from qmoe.errors import UsageError


def question(text: str, choices: list[str], gold: str) -> dict:
    prompt = f"Please choose the correct answer to the question: {text}\n\nAnswer format: {'/'.join(choices)}"
    return {"prompt": prompt, "target": f"the correct answer is {gold}", "gold": gold}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from qmoe.models import load_base_model

    model_dir = build_tiny_chat_model(tmp_path_factory.mktemp("model"))
    model, tokenizer, _ = load_base_model(str(model_dir), "nf4", "auto", "cpu")
    model = qmoe.attach(model, qmoe.AdapterConfig(method="moelora", num_experts=4, r=2, dropout=0.0))
    with torch.no_grad():
        for layer in qmoe.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return model.eval(), tokenizer


def test_the_choices_come_from_the_prompts_answer_format_line():
    assert answer_choices("Q?\n\nAnswer format: answer1/answer2/answer3") == ["answer1", "answer2", "answer3"]
    assert answer_choices("Q?\n\nAnswer format: true/false") == ["true", "false"]
    with pytest.raises(UsageError, match="no 'Answer format"):
        answer_choices("What is 2 + 3?")


@pytest.mark.parametrize("choices", [["1", "2", "3", "4"], ["zebra", "quokka", "axolotl"]])
def test_accuracy_agrees_with_scoring_each_choice_by_its_own_forward(tiny, choices):
    model, tokenizer = tiny
    records = [question(f"What is {a} + {a}?", choices, choices[a % len(choices)]) for a in range(1, 9)]
    prefix, own = _candidates(tokenizer, records[0], 256)
    # digits differ by one token (the one-forward path); the invented words by several (one forward per choice)
    assert all(len(t) == 1 for t in own) == (choices[0] == "1") and len(own) == len(choices)
    assert prefix and all(prefix == _candidates(tokenizer, r, 256)[0][: len(prefix)] for r in records[:1])
    result = choice_accuracy(model, tokenizer, records, max_length=256, batch_size=3)
    expected = []
    for r in records:
        scores = choice_logprobs_reference(model, tokenizer, r, 256)
        expected.append(int(max(range(len(scores)), key=scores.__getitem__) == choices.index(r["gold"])))
    assert result["per_example"] == expected
    assert result["correct"] == sum(expected) and result["n"] == len(records)
    assert result["accuracy"] == pytest.approx(sum(expected) / len(records))


def test_one_forward_scores_equal_the_reference_scores(tiny):
    from qmoe.compare.mixture import _next_token_logprobs

    model, tokenizer = tiny
    records = [question("What is 1 + 1?", ["1", "2", "3"], "2"), question("What is 12 + 30 + 4?", ["1", "2"], "1")]
    prepared = [_candidates(tokenizer, r, 256) for r in records]
    with torch.no_grad():
        logp = _next_token_logprobs(model, [p for p, _ in prepared], tokenizer.pad_token_id)
    for row, (record, (_, own)) in enumerate(zip(records, prepared, strict=True)):
        fast = logp[row, [t[0] for t in own]].tolist()
        assert fast == pytest.approx(choice_logprobs_reference(model, tokenizer, record, 256), abs=1e-4)


def test_routing_by_task_gives_each_task_a_share_per_layer_and_expert(tiny):
    from qmoe.chat import ChatModel

    model, tokenizer = tiny
    chat = ChatModel(model, tokenizer, source="tiny")
    texts = {"sums": ["What is 1 + 2? 3", "What is 4 + 4? 8"], "words": ["user assistant system", "system user"]}
    shares = task_routing(chat, texts)
    assert set(shares) == {"sums", "words"}
    for rows in shares.values():
        assert len(rows) == 2 and all(len(row) == 4 and sum(row) == pytest.approx(1.0) for row in rows)
    same = task_specialisation({"a": shares["sums"], "b": shares["sums"]})
    assert same["mean"] == pytest.approx(0.0)


def test_task_specialisation_is_the_distance_from_the_all_task_load():
    # two layers, two experts: task a always expert 0, task b always expert 1 -> 1 - 1/2 apart from the mean load
    disjoint = task_specialisation({"a": [[1.0, 0.0], [1.0, 0.0]], "b": [[0.0, 1.0], [0.0, 1.0]]})
    assert disjoint["task_vs_all_tv"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    assert disjoint["by_layer"] == [pytest.approx(0.5), pytest.approx(0.5)]
    mixed = task_specialisation({"a": [[1.0, 0.0], [0.5, 0.5]], "b": [[0.0, 1.0], [0.5, 0.5]]})
    assert mixed["by_layer"] == [pytest.approx(0.5), pytest.approx(0.0)] and mixed["mean"] == pytest.approx(0.25)
    # a third task sent evenly: the mean load is 1/2 everywhere, so it sits on it
    three = task_specialisation({"a": [[1.0, 0.0]], "b": [[0.0, 1.0]], "c": [[0.5, 0.5]]})
    assert three["task_vs_all_tv"]["c"] == pytest.approx(0.0) and three["mean"] == pytest.approx(1 / 3)
