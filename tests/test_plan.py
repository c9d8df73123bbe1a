"""qmoe plan: the activation part equals what a real CPU forward of the real 4-bit model saves; weight bytes
equal bitsandbytes' own tensors; the CLI's verdict exit codes and bad input; a 70B-shaped config plans."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import qmoe
from qmoe.cli import main
from qmoe.models import bnb_config
from qmoe.plan import Planner, plan_recipe
from qmoe.plan.activations import ActivationMeter, record_saved, training_forward
from qmoe.plan.report import cached_planner
from qmoe.plan.shapes import load_model_config, meta_model, weight_bytes
from qmoe.recipe import validate_recipe
from qmoe.testing import save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
METHODS = ["lora", "loramoe", "moelora", "loracoe"]


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """A random-weight 3-layer tiny Llama: the planner measures 2 layers and extrapolates the third."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny3"), layers=3)


def load_4bit(folder, quantization="nf4"):
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb_config(quantization, torch.float32), dtype=torch.float32
    )
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("method", METHODS)
def test_activations_equal_saved_tensors_of_a_real_forward(tiny3, method):
    torch.manual_seed(0)
    adapter = qmoe.AdapterConfig(method=method, stage="joint" if method == "loracoe" else None)
    model = qmoe.attach(load_4bit(tiny3), adapter).train()
    with torch.no_grad():  # non-zero expert outputs, so MoELoRA's contrastive loss and queues are live
        for layer in qmoe.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.02)
    ids = torch.randint(0, 256, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0  # padded, so transformers materialises the mask as in training
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    for _ in range(12 if method == "moelora" else 0):  # fill the contrastive queues
        training_forward(model, inputs)
    saved = record_saved(model, inputs)
    real = saved.bytes(saved.saved)

    planned = ActivationMeter(load_model_config(str(tiny3)), adapter, torch.float32, "cpu").measure(2, 40, False)
    if method == "moelora":
        # the planner assumes full queues and no padding left out of the anchors: within 2 %
        assert planned.saved == pytest.approx(real, rel=0.02)
        assert planned.contrastive_state > 0
    else:
        assert planned.saved == real
        assert planned.contrastive_state == 0


def test_checkpointing_keeps_less_than_without(tiny3):
    meter = ActivationMeter(load_model_config(str(tiny3)), qmoe.AdapterConfig(method="lora"), torch.float32)
    on, off = meter.measure(2, 64, True), meter.measure(2, 64, False)
    assert on.saved < off.saved == on.saved_without_checkpointing
    assert meter.measure(4, 64, True).saved > on.saved


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_weight_bytes_equal_bitsandbytes_tensors(tiny3, quantization):
    model = load_4bit(tiny3, quantization)
    packed = state = other = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is None:
            other += p.numel() * p.element_size()
            continue
        packed += p.numel() * p.element_size()
        while qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                state += t.numel() * t.element_size() if t is not None else 0
            qs = getattr(qs, "state2", None)
    other += sum(b.numel() * b.element_size() for b in model.buffers())
    planned = weight_bytes(meta_model(load_model_config(str(tiny3)), torch.float32), quantization)
    assert (planned.packed, planned.quant_state, planned.unquantized) == (packed, state, other)


def write_recipe(folder: Path, source: Path, **sections) -> Path:
    recipe = {
        "model": {"source": str(source), "device": "cpu", "compute_dtype": "float32"},
        "adapter": {"method": "moelora"},
        "train": {"batch_size": 2, "gradient_accumulation": 2},
        "data": {"max_length": 64},
    }
    for key, value in sections.items():
        recipe[key].update(value)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_verdict_is_the_exit_code(tiny3, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny3)
    assert main(["plan", str(recipe), "--vram", "64"]) == 0
    assert "64 GB: fits" in capsys.readouterr().out
    assert main(["plan", str(recipe), "--vram", "0.001"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", str(recipe), "--vram", "8", "0.001"]) == 0  # several sizes: a report, not a verdict


def test_cli_json(tiny3, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny3)
    assert main(["plan", str(recipe), "train.batch_size=4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["batch_size"] == 4 and [v["vram_gib"] for v in plan["verdicts"]] == [8, 12, 16, 24]
    assert plan["peak_bytes"] == sum(p["bytes"] for p in plan["parts"])
    best = plan["verdicts"][0]
    assert best["fits"] and best["batch_size"] * best["gradient_accumulation"] == 8  # effective batch kept


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vram", "-1"], "--vram -1"),
        (["train.batch_sise=4"], "train.batch_size"),
        (["adapter.top_k=99"], "top_k"),
    ],
)
def test_cli_bad_input(tiny3, tmp_path, capsys, argv, message):
    recipe = write_recipe(tmp_path, tiny3)
    assert main(["plan", str(recipe), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_missing_recipe_and_model(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    recipe = write_recipe(tmp_path, tmp_path / "no-model")
    (tmp_path / "no-model").mkdir()
    assert main(["plan", str(recipe)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_cuda_plan_from_a_cpu_machine_adds_the_allowance(tiny3):
    recipe = validate_recipe({"model": {"source": str(tiny3), "device": "cuda"}, "adapter": {"method": "lora"}})
    plan = Planner(recipe).plan()
    assert plan.device == "cuda" and plan.dtype == "bfloat16"
    assert plan.parts[-1].name == "CUDA context + allocator"


def test_concurrent_plans_of_a_shared_moelora_planner_agree(tiny3):
    """The UI plans from several threads through one cached planner (one meta model): each thread gets its
    own batch's plan, equal to planning alone, and no thread sees another's auxiliary losses."""

    def recipe(batch):
        return validate_recipe(
            {"model": {"source": str(tiny3)}, "adapter": {"method": "moelora"}, "train": {"batch_size": batch}}
        )

    alone = {batch: Planner(recipe(batch)).plan().peak_bytes for batch in (1, 2, 3, 4)}
    batches = [1, 2, 3, 4] * 4
    with ThreadPoolExecutor(8) as pool:
        plans = list(pool.map(lambda b: cached_planner(recipe(b)).plan(), batches))
    assert [p.batch_size for p in plans] == batches
    assert [p.peak_bytes for p in plans] == [alone[b] for b in batches]


@pytest.mark.slow
def test_a_70b_config_plans_from_shapes():
    recipe = validate_recipe(
        {
            "model": {"source": str(REPO / "benchmarks/configs/llama-3.1-70b"), "device": "cuda"},
            "adapter": {"method": "lora"},
        }
    )
    plan = plan_recipe(recipe, (24, 80))
    weights = sum(p.bytes for p in plan.parts[:3])
    assert 35e9 < weights < 45e9  # 70.6 B parameters, 4-bit, embeddings and head in bf16
    assert [v.fits for v in plan.verdicts] == [False, True]


def test_a_run_predicted_not_to_fit_the_gpu_warns_and_writes_plan_json(tiny3, tmp_path, monkeypatch, caplog):
    import qmoe.plan.run as plan_run_module

    monkeypatch.setattr(plan_run_module, "detected_gpu_gib", lambda: 0.001)  # the GPU size, nothing else
    recipe = validate_recipe({"model": {"source": str(tiny3), "device": "auto"}, "adapter": {"method": "lora"}})
    with caplog.at_level("WARNING", logger="qmoe"):
        plan = plan_run_module.plan_run(recipe, tmp_path)
    assert plan is not None and not plan.verdicts[0].fits
    assert any("will likely run out of memory" in r.message for r in caplog.records)
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["peak_bytes"] == plan.peak_bytes and written["detected_gpu_gib"] == 0.001


@pytest.mark.slow
def test_finetune_writes_plan_json_and_logs_planned_vs_measured(chat_model_dir, data_dir, tmp_path):
    from pipeline_support import tiny_recipe

    from qmoe.pipeline import run_finetune

    recipe = validate_recipe(tiny_recipe(chat_model_dir, data_dir, tmp_path / "run", train={"max_steps": 1}))
    assert run_finetune(recipe, tmp_path / "run", run_eval=False) == 0
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["method"] == "moelora" and plan["peak_bytes"] > 0
    assert "memory: planned tensor peak" in (tmp_path / "run" / "train.log").read_text()
