"""eval.scorer (issue 14, item 5): math-verify scoring of math answers beside qmoe's exact number extraction."""

from __future__ import annotations

import threading

import pytest

from qmoe.answers import score

pytest.importorskip("math_verify")


@pytest.mark.parametrize(
    ("generated", "gold"),
    [
        (r"So the answer is \boxed{\frac12}.", "0.5"),
        (r"$\frac{3}{4}$ of the cake", "0.75"),
        ("He buys 48 + 24 = 72 clips.\n#### 72", "72"),
        ("The total is $1,234.50", "1234.5"),
        (r"\boxed{2\sqrt{2}}", r"$\sqrt{8}$"),
    ],
)
def test_math_verify_accepts_equivalent_answers(generated, gold):
    _, correct = score("numeric", generated, gold, "math-verify")
    assert correct


def test_boxed_fraction_is_what_math_verify_adds_over_exact():
    generated = r"Half of it: \boxed{\frac12}"
    assert score("numeric", generated, "0.5", "exact")[1] is False  # exact reads the number 12
    prediction, correct = score("numeric", generated, "0.5", "math-verify")
    assert correct and prediction == r"\frac{1}{2}"
    assert score("numeric", r"\boxed{\frac13}", "0.5", "math-verify")[1] is False


def test_choices_and_text_answers_score_the_same_with_either_scorer():
    assert score("choice", "the correct answer is solution2", "solution2", "math-verify") == ("solution2", True)
    assert score("letter", "The answer is (B)", "B", "math-verify") == ("B", True)
    # a gold answer that is not mathematical falls back to exact matching
    assert score("exact", "Paris.", "paris", "math-verify") == ("paris", True)


def test_math_verify_outside_the_main_thread():
    # math-verify bounds its work with SIGALRM, which only the main thread has (the UI evaluates in workers)
    results = []
    worker = threading.Thread(target=lambda: results.append(score("numeric", r"\boxed{\frac12}", "0.5", "math-verify")))
    worker.start()
    worker.join()
    assert results and results[0][1] is True


def test_unknown_scorer_names_the_field():
    from qmoe.errors import UsageError

    with pytest.raises(UsageError, match="eval.scorer='fuzzy' is invalid: one of exact, math-verify"):
        score("numeric", "1", "1", "fuzzy")


def test_evaluation_records_the_scorer_it_used(chat_model_dir):
    from qmoe.evaluation import evaluate_records
    from qmoe.models import load_base_model

    model, tokenizer, _ = load_base_model(str(chat_model_dir), "nf4", "float32", "cpu")
    records = [{"prompt": "Tom has 3 apples and buys 5 more.", "gold": "8"}]
    result = evaluate_records(
        model, tokenizer, records, "numeric", task="t", max_new_tokens=2, progress=False, scorer="math-verify"
    )
    assert result["scorer"] == "math-verify" and result["n"] == 1
