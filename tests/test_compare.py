"""`qmoe compare` (issue 7's harness) end to end on a tiny model: trains two recipes, evaluates them and the
base model on two test sets, writes the results block and keeps hand-written text around it; re-running
reuses finished runs and evaluations."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from pipeline_support import arithmetic_items, build_tiny_chat_model, tiny_recipe, write_jsonl

from qmoe.compare.runner import RESULTS_JSON, SPECIALISATION_JSON
from qmoe.rundir import RECIPE


@pytest.mark.slow
def test_compare_trains_evaluates_and_writes_results(tmp_path):
    model_dir = build_tiny_chat_model(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", arithmetic_items(24))
    write_jsonl(data / "test.jsonl", arithmetic_items(6, start=100))
    # a second test set in the LLM-Adapters format (instruction/answer), as the papers' math suites are
    (data / "adds").mkdir()
    (data / "adds" / "test.json").write_text(
        json.dumps(
            [
                {
                    "instruction": x["question"],
                    "input": "",
                    "output": x["answer"],
                    "answer": x["answer"].split("#### ")[1],
                }
                for x in arithmetic_items(4, start=300)
            ]
        )
    )
    recipes = []
    for method in ("lora", "moelora"):
        recipe = tiny_recipe(model_dir, data, tmp_path / "unused", method=method)
        recipe["train"]["max_steps"] = 3
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        recipes.append(str(path))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nHand-written analysis stays.\n")
    # one run given as a positional recipe, one through --run with its own override
    cmd = [
        sys.executable,
        "-m",
        "qmoe.cli",
        "compare",
        recipes[0],
        "--run",
        "moelora",
        recipes[1],
        "adapter.balance_loss_weight=0.05",
        "--pair",
        "lora",
        "moelora",
        "--eval-tasks",
        str(data / "adds" / "test.json"),
        "gsm8k",
        "--eval-limit",
        "3",
        "--max-new-tokens",
        "8",
        "--out-dir",
        str(tmp_path / "runs"),
        "--results",
        str(results),
        "--figures",
        str(tmp_path / "figs"),
    ]
    env = {**os.environ, "QMOE_DATA_DIR": str(data)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "$ qmoe finetune" in proc.stdout  # subprocesses are shown as a person would type them
    text = results.read_text()
    assert "Hand-written analysis stays." in text
    assert "qmoe compare" in text and "| base model |" in text
    rows = [
        line for line in text.splitlines() if line.startswith("| lora (lora)") or line.startswith("| moelora (moelora)")
    ]
    assert len(rows) == 2
    records = json.loads((tmp_path / "runs" / RESULTS_JSON).read_text())
    by_label = {r["label"]: r for r in records}
    resolved = yaml.safe_load((tmp_path / "runs" / "moelora" / RECIPE).read_text())
    assert resolved["adapter"]["balance_loss_weight"] == 0.05
    assert by_label["moelora"]["trainable_parameters"] > 0 and by_label["lora"]["train_seconds"] > 0
    for label in ("base model", "lora", "moelora"):
        assert set(by_label[label]["accuracy"]) == {"adds", "gsm8k"}
        assert by_label[label]["n"] == {"adds": 3, "gsm8k": 3}
    # every other row is paired against the first run, problem by problem
    assert "every run against `lora`" in text
    paired = text.split("Paired comparisons")[1].split("Expert specialisation")[0].splitlines()
    assert [line.split(" | ")[:2] for line in paired if line.startswith("| ") and "---" not in line][1:] == [
        ["| base model", "lora"],
        ["| moelora", "lora"],
        ["| lora", "moelora"],
    ]  # the --pair row comes last
    assert all(line.count("|") == 9 for line in paired if line.startswith("| "))
    # held-out answer loss for every row, in the table and paired against the first run
    for label in ("base model", "lora", "moelora"):
        assert by_label[label]["heldout"]["tokens"] > 0 and by_label[label]["heldout"]["nll"] > 0
    assert "GSM8K answer NLL" in text and " ± " in text.split("Paired comparisons")[1]
    spec = json.loads((tmp_path / "runs" / SPECIALISATION_JSON).read_text())
    assert list(spec) == ["moelora (untrained router)", "moelora"] and spec["moelora"]["numeric_tokens"] > 0
    assert (
        0.0 <= spec["moelora"]["numeric_vs_all_tv"] <= 1.0
        and "| moelora | " in text.split("| run | numeric tokens |")[1]
    )
    figures = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert figures == [
        "accuracy-per-task.png",
        "expert-load-per-layer.png",
        "numeric-token-routing.png",
        "training-loss.png",
    ]
    assert all(f"({tmp_path / 'figs' / name})" in text or name in text for name in figures)
    # a second run reuses everything: no training or evaluation subprocess output
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0
    assert "$ qmoe finetune" not in again.stdout and "$ qmoe eval" not in again.stdout
    assert results.read_text().count("qmoe compare: begin") == 1


def test_specialisation_summary_on_known_shares():
    import torch

    from qmoe.compare.specialisation import summarise

    everything = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    numeric = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    m = summarise(numeric, everything, n_numeric=7)
    assert m["numeric_tokens"] == 7 and m["experts"] == 4
    assert abs(m["numeric_vs_all_tv"] - (0.75 + 0.0) / 2) < 1e-6  # layer 0 moves 75% of the mass, layer 1 none
    assert abs(m["numeric_top_share"] - (1.0 + 0.5) / 2) < 1e-6
    assert abs(m["load_cv"] - (0.0 + 1.0) / 2) < 1e-6  # layer 1: std 0.25 / mean 0.25


def test_pair_with_an_unknown_label_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "qmoe.cli", "compare", "recipes/quickstart.yaml", "--pair", "quickstart", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no run labelled 'nope'; runs: quickstart" in proc.stderr + proc.stdout


def compare_command(tmp_path, *args):
    return [sys.executable, "-m", "qmoe.cli", "compare", "--out-dir", str(tmp_path / "runs"), *args]


def select_setup(tmp_path):
    model_dir = build_tiny_chat_model(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", arithmetic_items(24))
    write_jsonl(data / "test.jsonl", arithmetic_items(4, start=100))
    recipe = tiny_recipe(model_dir, data, tmp_path / "unused", method="lora")
    recipe["train"]["max_steps"] = 2
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, {**os.environ, "QMOE_DATA_DIR": str(data)}


@pytest.mark.slow
def test_select_by_validation_evaluates_only_each_groups_best(tmp_path):
    recipe, env = select_setup(tmp_path)
    results = tmp_path / "RESULTS.md"
    runs = [("lora@lr1e-2", "train.lr=1e-2"), ("lora@lr1e-5", "train.lr=1e-5"), ("other", "train.lr=1e-3")]
    cmd = compare_command(tmp_path, "--select-by", "val_nll", "--val-last", "8", "--set", "data.limit=16")
    for label, override in runs:
        cmd += ["--run", label, str(recipe), override]
    cmd += ["--eval-limit", "2", "--max-new-tokens", "4", "--results", str(results), "--figures", ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    selection = (tmp_path / "runs" / "selection.md").read_text()
    rows = {line.split(" | ")[0][2:]: line for line in selection.splitlines() if line.startswith("| ") and "@" in line}
    assert set(rows) == {"lora@lr1e-2", "lora@lr1e-5"}
    chosen = next(label for label, line in rows.items() if "**yes**" in line)
    other = next(label for label in rows if label != chosen)
    # 2 steps at 1e-5 barely move the adapter; 1e-2 does: validation tells them apart, paired
    nll = {label: float(line.split(" | ")[1]) for label, line in rows.items()}
    assert nll[chosen] < nll[other] and "(±" in rows[other]
    assert (tmp_path / "runs" / chosen / "validation-nll.json").is_file()
    # the test set is touched by the selected runs only
    assert (tmp_path / "runs" / chosen / "eval-gsm8k.json").is_file()
    assert not (tmp_path / "runs" / other / "eval-gsm8k.json").exists()
    text = results.read_text()
    assert "Selected by validation answer NLL on the last 8 records" in text
    assert f"| lora ({chosen}) |" in text and f"| lora ({other}) |" not in text and "| lora (other) |" in text


def test_select_by_validation_refuses_runs_that_train_on_the_validation_split(tmp_path):
    recipe, env = select_setup(tmp_path)
    base = compare_command(tmp_path, "--select-by", "val_nll", "--val-last", "8", "--run", "a@1", str(recipe))
    proc = subprocess.run([*base, "data.limit=20"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "reaches into its last 8 (the validation split); set data.limit to at most 16" in proc.stderr
    differing = [*base, "data.limit=8", "--run", "a@2", str(recipe), "data.limit=8", "data.max_length=48"]
    proc = subprocess.run(differing, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "runs 'a@1' and 'a@2' differ in data.max_length (64 vs 48)" in proc.stderr
    assert not (tmp_path / "runs" / "a@1").exists()  # refused before any training
