"""benchmarks/round2.py (issue 21's driver): every run it plans is a valid recipe at the equal parameter
budgets, LoRACoE's two stages scale together, and the task mixture interleaves its four training sets."""

import importlib.util
import json
import sys

import pytest
from conftest import REPO, SHARED

from qmoe.recipe import load_recipe

spec = importlib.util.spec_from_file_location("round2", REPO / "benchmarks" / "round2.py")
round2 = importlib.util.module_from_spec(spec)
sys.modules["round2"] = round2
spec.loader.exec_module(round2)


@pytest.fixture
def no_records(tmp_path, monkeypatch):
    """round2 reading and writing its records under tmp_path instead of benchmarks/results/round2."""
    monkeypatch.setattr(round2, "RECORDS", tmp_path / "records")
    return tmp_path / "records"


def validated(records, label, nll):
    path = records / "sweep" / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"label": label, "validation": {"nll": nll, "tokens": 1, "per_example": [[nll, 1]]}}))


def test_the_sweep_is_every_method_at_every_rate_and_each_run_is_a_valid_recipe(no_records):
    runs = round2.sweep_runs()
    assert [label for label, _, _ in runs] == [f"{m}@lr{lr}" for m in round2.METHODS for lr in round2.LEARNING_RATES]
    for label, recipe, overrides in runs:
        r = load_recipe(REPO / recipe, overrides)
        assert r.data.limit == 200 and r.train.max_steps == 50 and r.train.batch_size == 4
        assert r.adapter.alpha == 2 * r.adapter.r  # alpha = 2r everywhere
        lr = float(label.split("@lr")[1])
        if r.adapter.method == "loracoe":
            assert [(s.stage, s.max_steps, s.lr) for s in r.train.stages] == [
                ("warmup", 25, lr),
                ("joint", 25, pytest.approx(lr / 4)),
            ]
        else:
            assert r.train.lr == lr and not r.train.stages
    no_cl = load_recipe(REPO / runs[9][1], runs[9][2])
    assert runs[9][0].startswith("moelora-no-contrastive") and no_cl.adapter.contrastive_loss_weight == 0


@pytest.mark.skipif(not (SHARED / "data" / "llm-adapters").is_dir(), reason="needs ../shared/data")
def test_the_mixture_interleaves_gsm8k_and_the_three_commonsense_sets(tmp_path):
    path = round2.mixture_file(tmp_path)
    rows = json.loads(path.read_text())
    assert len(rows) == 4 * round2.MIXTURE_PER_TASK
    assert "####" in rows[0]["output"] and rows[2]["answer"] in ("true", "false")
    assert rows[1]["answer"].startswith("answer") and rows[3]["answer"].startswith("answer")
    r = load_recipe(REPO / "recipes/gsm8k-lora.yaml", [*round2.common_overrides([f"data.source={path}"], 800)])
    assert r.train.max_steps == 200 and r.data.source == str(path)
    assert round2.mixture_file(tmp_path) == path  # written once


def test_a_best_rate_on_the_grids_edge_adds_the_rate_beyond_it(no_records):
    for lr, nll in (("1e-4", 1.3), ("3e-4", 1.2), ("1e-3", 1.1)):  # LoRA: best at the top edge
        validated(no_records, f"lora@lr{lr}", nll)
    for lr, nll in (("1e-4", 1.1), ("3e-4", 1.2), ("1e-3", 1.3)):  # LoRAMoE: best at the bottom edge
        validated(no_records, f"loramoe@lr{lr}", nll)
    for lr, nll in (("1e-4", 1.3), ("3e-4", 1.1), ("1e-3", 1.2)):  # MoELoRA: inside the grid
        validated(no_records, f"moelora@lr{lr}", nll)
    assert round2.sweep_rates("lora") == ["1e-4", "3e-4", "1e-3", "3e-3"]
    assert round2.sweep_rates("loramoe") == ["1e-4", "3e-4", "1e-3", "3e-5"]
    assert round2.sweep_rates("moelora") == ["1e-4", "3e-4", "1e-3"]
    assert round2.sweep_rates("loracoe") == ["1e-4", "3e-4", "1e-3"]  # nothing validated yet
    assert round2.best_rates() == {"moelora": "3e-4"}  # LoRA and LoRAMoE wait for their extra rate
    validated(no_records, "lora@lr3e-3", 1.15)
    assert round2.best_rates() == {"lora": "1e-3", "moelora": "3e-4"}
    assert [label for label, _, _ in round2.curve_runs()] == [
        "lora@n800",
        "moelora@n800",
        "lora@n2000",
        "moelora@n2000",
    ]


def mixture_record(records, label, nll, correct, routed):
    tasks = ("gsm8k", *round2.MIXTURE_TASKS)
    record = {"label": label, "overrides": ["train.lr=1e-3"]}
    for task in tasks:
        record["validation" if task == "gsm8k" else f"validation-{task}"] = {
            "nll": nll,
            "tokens": 4,
            "per_example": [[nll + d, 1] for d in (-0.1, 0.0, 0.0, 0.1)],
        }
    record["choices"] = {
        t: {"accuracy": sum(correct) / len(correct), "correct": sum(correct), "n": len(correct), "per_example": correct}
        for t in round2.MIXTURE_TASKS
    }
    if routed:
        own = {t: [[1.0, 0.0]] if t == "gsm8k" else [[0.0, 1.0]] for t in tasks}  # GSM8K alone on expert 0
        record["routing-by-task"] = own
        record["routing-by-task-untrained"] = {t: [[0.5, 0.5]] for t in tasks}
    path = records / "mixture" / f"{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_the_mixture_report_compares_every_method_with_lora_on_every_task(no_records, tmp_path, monkeypatch):
    monkeypatch.setattr(round2, "FIGURES", tmp_path / "figures")
    assert round2.report_mixture() is None  # nothing measured yet
    mixture_record(no_records, "lora@mixture", 1.0, [1, 1, 0, 0], routed=False)
    mixture_record(no_records, "moelora@mixture", 1.2, [1, 1, 1, 1], routed=True)
    text = round2.report_mixture()
    assert "| lora (1e-3) | 1.0000 | 1.0000 |" in text
    assert "| moelora (1e-3) | 1.2000 (+0.2000 ±0.0000)" in text  # paired: same problems, same shift
    # accuracy: 4/4 against LoRA's 2/4 -> +50 points over the same problems, 2 wins 0 losses (p = 0.5)
    assert "100.0% [51.0, 100.0] (vs LoRA +50.0 pts, p=0.50)" in text
    # GSM8K's tokens on expert 0, the others on expert 1: the equal-weight mean load is (1/4, 3/4), so GSM8K sits
    # 0.75 from it and each other task 0.25; the untrained router sends every task evenly (0 apart)
    assert "| moelora | 2 | 0.750 (0.000) | 0.250 (0.000) |" in text and "| 0.375 (0.000) |" in text
    assert "moelora, layer 0 (`mlp.down_proj`)" in text and "| gsm8k | 100% | 0% |" in text  # expert by task
    assert "Still to measure: loramoe@mixture" in text
    assert (tmp_path / "figures" / "round2-mixture-routing.png").is_file()
    assert (no_records / "mixture.md").read_text() == text


def test_the_test_report_puts_each_selected_run_beside_what_validation_said(no_records):
    for method, shift in (("lora", 0.0), ("moelora", 0.1)):
        for lr, nll in (("1e-4", 1.3), ("3e-4", 1.2), ("1e-3", 1.1), ("3e-3", 1.15)):
            validated(no_records, f"{method}@lr{lr}", nll + shift)
    assert round2.report_test() is None  # validated, not tested yet
    for method, shift in (("lora", 0.0), ("moelora", 0.05)):
        path = no_records / "sweep" / f"{method}@lr1e-3.json"
        record = json.loads(path.read_text())
        record["test"] = {"nll": 1.2 + shift, "tokens": 2, "per_example": [[1.2 + shift, 1], [1.2 + shift, 1]]}
        path.write_text(json.dumps(record))
    text = round2.report_test()
    assert "| 200 | lora | 1.2000 ±0.0000 | — | — |" in text
    assert "| 200 | moelora | 1.2500 ±0.0000 | +0.0500 (±0.0000) | +0.1000 (±0.0000) |" in text
    assert (no_records / "test.md").read_text() == text


def test_the_report_replaces_its_block_in_the_results_file_and_keeps_the_rest(no_records, tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nHand-written verdict.\n")
    for lr, nll in (("1e-4", 1.3), ("3e-4", 1.2), ("1e-3", 1.1), ("3e-3", 1.15)):
        validated(no_records, f"lora@lr{lr}", nll)
    monkeypatch.setattr(round2, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(sys, "argv", ["round2.py", "--stage", "report", "--results", str(results)])
    assert round2.main() == 0
    monkeypatch.setattr(sys, "argv", ["round2.py", "--stage", "report", "--results", str(results)])
    assert round2.main() == 0  # again: the block is replaced, not appended twice
    text = results.read_text()
    assert text.startswith("# Results\n\nHand-written verdict.\n") and text.count(round2.RESULTS_BEGIN) == 1
    block = text.split(round2.RESULTS_BEGIN)[1]
    assert "python benchmarks/round2.py --stage sweep" in block and "#### Learning-rate sweep" in block
    assert "| lora@lr1e-3 | 1.1000 | — | **yes** |" in block and "#### Task mixture" not in block  # nothing measured
    assert "(figures/round2-lr-sweep.png)" in block  # linked relative to the results file
