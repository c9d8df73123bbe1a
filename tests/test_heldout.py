"""Held-out answer loss: the training objective on unseen problems, computed problem by problem."""

import pytest
import torch
from pipeline_support import arithmetic_items, build_tiny_chat_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from qmoe.compare.heldout import answer_nll
from qmoe.compare.statistics import paired_nll_difference
from qmoe.data import PadCollator, tokenize_records


def _records(n):
    return [
        {"prompt": x["question"], "target": x["answer"], "gold": x["answer"].split("#### ")[1]}
        for x in arithmetic_items(n, start=500)
    ]


def test_answer_nll_equals_the_models_own_loss_on_answer_tokens(tmp_path):
    model_dir = build_tiny_chat_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = _records(5)
    out = answer_nll(model, tok, records, batch_size=2)  # padding across batches must not change anything
    examples = tokenize_records(tok, records, 512)
    assert [n for _, n in out["per_example"]] == [sum(label != -100 for label in e["labels"][1:]) for e in examples]
    with torch.no_grad():
        for (nll_sum, tokens), example in zip(out["per_example"], examples, strict=False):
            batch = PadCollator(tok.pad_token_id)([example])
            assert nll_sum / tokens == pytest.approx(float(model(**batch).loss), rel=1e-4)
    assert out["nll"] == pytest.approx(sum(s for s, _ in out["per_example"]) / out["tokens"])


def test_paired_difference_and_interval():
    ref = {"per_example": [[10.0, 10], [20.0, 10], [30.0, 10]]}
    same = paired_nll_difference(ref, ref)
    assert same == (0.0, 0.0)
    better = {"per_example": [[9.0, 10], [18.0, 10], [27.0, 10]]}
    delta, half = paired_nll_difference(better, ref)
    assert delta == pytest.approx(-6.0 / 30) and half > 0
    assert paired_nll_difference({"per_example": [[1.0, 3]]}, ref) is None  # different problems
