"""qmoe finetune / eval / chat end to end on a tiny NF4 chat model (CPU, seconds per run)."""

import json
import math
from pathlib import Path

import pytest
import yaml
from pipeline_support import qmoe_cli, tiny_recipe, write_jsonl, write_recipe

import qmoe
from qmoe.errors import UsageError
from qmoe.io import read_jsonl
from qmoe.pipeline import run_finetune
from qmoe.recipe import validate_recipe

pytestmark = pytest.mark.slow  # every test here runs `qmoe finetune` (in process or as a subprocess)

METRIC_FIELDS = {
    "step",
    "epoch",
    "loss",
    "lm_loss",
    "balance_loss",
    "contrastive_loss",
    "lr",
    "tokens_per_s",
    "peak_mem_mb",
    "stage",
    "expert_load",
}
STATUS_FIELDS = {
    "state",
    "pid",
    "started",
    "updated",
    "step",
    "max_steps",
    "stage",
    "error",
    "trainable_parameters",
    "method",
    "kernel_backend",
}


@pytest.fixture
def make_recipe(chat_model_dir, data_dir, tmp_path):
    def make(method="moelora", run="run", **sections):
        return tiny_recipe(chat_model_dir, data_dir, tmp_path / run, method=method, **sections)

    return make


def check_metrics(run_dir: Path, num_experts, expected_steps: list[int]) -> list[dict]:
    """Every record has the documented fields; ``num_experts`` (one value, or one per record; None = no
    routing) gives the length of each expert_load entry."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == expected_steps
    per_record = num_experts if isinstance(num_experts, list) else [num_experts] * len(records)
    for r, num_experts in zip(records, per_record, strict=False):
        assert set(r) == METRIC_FIELDS
        for key in (
            "loss",
            "lm_loss",
            "balance_loss",
            "contrastive_loss",
            "lr",
            "tokens_per_s",
            "peak_mem_mb",
            "epoch",
        ):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
        if num_experts is None:
            assert r["expert_load"] == {}
        else:
            assert r["expert_load"], "routed adapters report their load"
            for fractions in r["expert_load"].values():
                assert len(fractions) == num_experts
                assert abs(sum(fractions) - 1) < 1e-6
    return records


def test_finetune_cli_writes_the_documented_run_directory(make_recipe, tmp_path):
    recipe_file = write_recipe(tmp_path / "recipe.yaml", make_recipe())
    done = qmoe_cli("finetune", recipe_file, "train.max_steps=5", "data.prompt_template=Q: {prompt}", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"

    resolved = validate_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    assert resolved.train.max_steps == 5 and resolved.output_dir == str(run_dir)
    assert resolved.adapter.contrastive_temperature == 0.07  # paper defaults written out

    records = check_metrics(run_dir, num_experts=4, expected_steps=[1, 2, 3, 4, 5])
    assert all(r["stage"] is None for r in records)
    assert records[-1]["epoch"] > records[0]["epoch"]
    assert any(r["balance_loss"] > 0 for r in records)
    assert any(r["contrastive_loss"] > 0 for r in records)
    assert all(
        abs(r["loss"] - r["lm_loss"] - 0.01 * r["balance_loss"] - 0.1 * r["contrastive_loss"]) < 1e-4 for r in records
    )

    status = json.loads((run_dir / "status.json").read_text())
    assert set(status) == STATUS_FIELDS
    assert status["state"] == "finished" and status["error"] is None
    assert status["step"] == status["max_steps"] == 5
    assert status["method"] == "moelora" and status["trainable_parameters"] > 0

    model = qmoe.testing.load_model(resolved.model.source)
    qmoe.load_adapter(model, run_dir / "adapter")
    assert qmoe.adapter_parameters(model) == status["trainable_parameters"]

    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert evaluation["task"] == "gsm8k" and evaluation["n"] == 4
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    assert len(evaluation["predictions"]) == 4
    assert {"prompt", "gold", "generated", "prediction", "correct"} <= set(evaluation["predictions"][0])
    assert evaluation["predictions"][0]["gold"] == str(3 + 100 % 17 + 5 + 700 % 23)
    assert evaluation["predictions"][0]["prompt"].startswith("Q: Tom has")  # data.prompt_template applied

    log = (run_dir / "train.log").read_text()
    assert "checkpoint saved" in log and "accuracy on gsm8k" in log
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["checkpoint-3", "checkpoint-5"]


def test_finetune_prints_each_logging_step_once_under_one_progress_bar(make_recipe, tmp_path):
    recipe = make_recipe("loramoe", train={"max_steps": 4, "logging_steps": 2}, eval={"enabled": False})
    done = qmoe_cli("finetune", write_recipe(tmp_path / "r.yaml", recipe), env={"TQDM_DISABLE": None})  # bar on
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    assert "{'loss'" not in shown and "train_runtime" not in shown  # Trainer's own log dicts are gone
    assert "step/s]" in shown  # our bar (steps of the whole run, rate and ETA)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 4]
    for r in records:  # exactly one line per logging step, carrying the metrics.jsonl numbers
        lines = [line for line in shown.splitlines() if f" step {r['step']}/4 " in line]
        assert len(lines) == 1, (r["step"], lines)
        for text in (f"loss {r['loss']:.4f}", f"lm_loss {r['lm_loss']:.4f}", f"balance_loss {r['balance_loss']:.4f}"):
            assert text in lines[0], (text, lines[0])
        assert f"lr {r['lr']:.2e}" in lines[0] and "tok/s" in lines[0]


def test_run_directory_with_only_a_recipe_starts_a_fresh_run_there(make_recipe, tmp_path):
    """The UI's launch: it writes RUN/recipe.yaml and runs ``qmoe finetune RUN``."""
    run_dir = tmp_path / "ui-run"
    run_dir.mkdir()
    write_recipe(run_dir / "recipe.yaml", make_recipe(run="elsewhere", eval={"enabled": False}))
    done = qmoe_cli("finetune", run_dir, "train.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()
    assert not (tmp_path / "elsewhere").exists()
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["output_dir"] == str(run_dir)

    again = qmoe_cli("finetune", run_dir)
    assert again.returncode == 2
    assert "already holds results" in again.stderr and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()


def test_overwrite_replaces_a_previous_run(make_recipe):
    recipe = validate_recipe(make_recipe(train={"max_steps": 2}, eval={"enabled": False}))
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    (run_dir / "eval.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds results"):
        run_finetune(recipe, run_dir)
    assert run_finetune(recipe, run_dir, overwrite=True) == 0
    assert not (run_dir / "eval.json").exists()
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_loracoe_stages_run_in_one_command(make_recipe):
    stages = [{"stage": "warmup", "max_steps": 3, "lr": 2e-4}, {"stage": "joint", "max_steps": 2, "lr": 5e-5}]
    recipe = validate_recipe(
        make_recipe("loracoe", adapter={"num_experts": 2}, train={"stages": stages}, eval={"enabled": False})
    )
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    # warm-up is a plain LoRA (no routing); joint training routes over the r ranks
    r = recipe.adapter.r
    records = check_metrics(run_dir, num_experts=[None] * 3 + [r] * 2, expected_steps=[1, 2, 3, 4, 5])
    assert [r["stage"] for r in records] == ["warmup"] * 3 + ["joint"] * 2
    assert records[0]["lr"] == 2e-4 and records[3]["lr"] == 5e-5  # each stage starts at its own lr (no warm-up)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 5 and status["stage"] == "joint"
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["stage"] == "joint"


def test_lora_reports_an_empty_expert_load(make_recipe):
    recipe = validate_recipe(make_recipe("lora", train={"max_steps": 2}, eval={"enabled": False}))
    assert run_finetune(recipe, Path(recipe.output_dir)) == 0
    check_metrics(Path(recipe.output_dir), num_experts=None, expected_steps=[1, 2])


def test_eval_command_on_run_and_base(make_recipe, tmp_path, capsys):
    from qmoe.cli import main

    recipe = validate_recipe(make_recipe(train={"max_steps": 2}, eval={"enabled": False}))
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    done = qmoe_cli("eval", run_dir, "--limit", "3", "--batch-size", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accuracy" in done.stdout and "gsm8k" in done.stdout
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["n"] == 3 and result["adapter"].endswith("adapter")

    # the same command in-process (no interpreter start-up): base model alone, then another task
    assert main(["eval", str(run_dir), "--limit", "2", "--base-only"]) == 0
    assert "(base)" in capsys.readouterr().out
    assert json.loads((run_dir / "eval-base.json").read_text())["adapter"] is None

    jsonl = write_jsonl(
        tmp_path / "qa.jsonl", [{"question": "Say 7", "answer": "7"}, {"question": "Say 8", "answer": "8"}]
    )
    assert (
        main(["eval", str(run_dir / "adapter"), "--task", "jsonl", "--data", str(jsonl), "--base", recipe.model.source])
        == 0
    )
    other = json.loads((run_dir / "adapter" / "eval-jsonl.json").read_text())
    assert other["n"] == 2 and other["kind"] == "exact"
    assert main(["eval", str(run_dir), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_eval_on_an_llm_adapters_test_set(make_recipe, shared_dir):
    recipe = validate_recipe(make_recipe(train={"max_steps": 1}, eval={"enabled": False}))
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    test_file = shared_dir / "data" / "llm-adapters" / "dataset" / "boolq" / "test.json"
    done = qmoe_cli("eval", run_dir, "--task", test_file, "--limit", "2", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "eval-boolq.json").read_text())
    assert result["kind"] == "choice" and result["n"] == 2
    assert result["predictions"][0]["gold"] in ("true", "false")


def test_chat_streams_and_reports_routing_per_generated_token(make_recipe):
    from qmoe.chat import load_chat_model, stream_reply, top_experts

    recipe = validate_recipe(make_recipe(train={"max_steps": 1}, eval={"enabled": False}))
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    chat = load_chat_model(run_dir)
    assert chat.routed_layers and chat.adapter_dir == run_dir / "adapter"
    events = list(stream_reply(chat, [{"role": "user", "content": "Tom has 3 apples"}], max_new_tokens=6, trace=True))
    final = events[-1]
    assert final["done"] and all("text" in e for e in events)
    assert "".join(e["text"] for e in events[:-1]) == final["text"]
    n_tokens = len(final["tokens"])
    assert n_tokens >= 1
    layer = chat.routed_layers[0]
    weights = final["routing"][layer]
    assert weights.shape == (n_tokens, recipe.adapter.num_experts)
    picks = top_experts(weights, 2)
    assert len(picks) == n_tokens and all(len(p) == 2 for p in picks)

    printed = qmoe_cli("chat", run_dir, "--routing", "--max-new-tokens", "3", input="Tom has 3 apples\n\n")
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "routing at" in printed.stdout


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            '{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": \n',
            r"train.jsonl line 2: malformed JSON",
        ),
        ("", r"is empty"),
        ('{"question": "a"}\n', r"record 1: missing field 'answer'"),
    ],
)
def test_bad_training_data_exits_2_naming_the_file(make_recipe, tmp_path, content, expected):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "train.jsonl").write_text(content)
    recipe_file = write_recipe(tmp_path / "r.yaml", make_recipe(data={"path": str(data / "train.jsonl")}))
    done = qmoe_cli("finetune", recipe_file)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    import re

    assert re.search(expected, done.stderr), done.stderr[-2000:]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and re.search(expected, status["error"])


def test_hub_id_offline_is_one_clear_message(make_recipe, tmp_path):
    recipe_file = write_recipe(tmp_path / "r.yaml", make_recipe(model={"source": "Qwen/Qwen2.5-1.5B-Instruct"}))
    done = qmoe_cli("finetune", recipe_file, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert done.returncode == 2
    assert "hub is unreachable" in done.stderr and "builtin:smollm2-135m-instruct" in done.stderr
    assert "Traceback" not in done.stderr
