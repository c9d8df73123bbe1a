"""Training options users expect (issue 14, item 4): train.report_to, train.optim, train.adapter_dtype,
model.attn_implementation."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from pipeline_support import tiny_recipe

import qmoe
from qmoe.attach import cast_adapter
from qmoe.callbacks import tracker_metrics
from qmoe.errors import UsageError
from qmoe.io import read_jsonl
from qmoe.models import load_base_model
from qmoe.pipeline import check_training_options, run_finetune
from qmoe.recipe import RecipeError, validate_recipe


def recipe_for(chat_model_dir, data_dir, tmp_path, method="moelora", **sections):
    return validate_recipe(tiny_recipe(chat_model_dir, data_dir, tmp_path / "run", method=method, **sections))


# ------------------------------------------------------------------------------------------ recipe fields


def test_new_fields_default_to_the_previous_behaviour_and_peft_master_weights():
    recipe = validate_recipe({"adapter": {"method": "lora"}})
    assert recipe.train.optim == "adamw_torch"
    assert recipe.train.report_to == "none" and recipe.train.trackers == []
    assert recipe.train.adapter_dtype == "float32"
    assert recipe.model.attn_implementation == "auto"
    assert recipe.eval.scorer == "exact"
    both = validate_recipe({"adapter": {"method": "lora"}, "train": {"report_to": ["tensorboard", "wandb"]}})
    assert both.train.trackers == ["tensorboard", "wandb"]


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ("train.optim", "sgd", "train.optim: Input should be 'adamw_torch'"),
        ("train.report_to", "mlflow", "train.report_to: must be one of none, tensorboard, wandb, trackio"),
        ("train.adapter_dtype", "int8", "train.adapter_dtype"),
        ("model.attn_implementation", "flash", "model.attn_implementation"),
    ],
)
def test_bad_values_name_the_field_and_what_is_valid(section, value, expected):
    name, key = section.split(".")
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(")):
        validate_recipe({"adapter": {"method": "lora"}, name: {key: value}})


def test_paged_optimizers_are_refused_on_cpu_and_missing_trackers_named(chat_model_dir, data_dir, tmp_path):
    paged = recipe_for(chat_model_dir, data_dir, tmp_path, train={"optim": "paged_adamw_8bit"})
    with pytest.raises(UsageError, match=r"train.optim=paged_adamw_8bit .* needs CUDA .*use adamw_bnb_8bit"):
        check_training_options(paged, "cpu")
    check_training_options(recipe_for(chat_model_dir, data_dir, tmp_path, train={"optim": "adamw_bnb_8bit"}), "cpu")
    if importlib.util.find_spec("wandb") is None:
        tracked = recipe_for(chat_model_dir, data_dir, tmp_path, train={"report_to": ["wandb"]})
        with pytest.raises(UsageError, match=r"train.report_to=wandb needs the wandb package: pip install wandb"):
            check_training_options(tracked, "cpu")


# ------------------------------------------------------------------------------------------ trackers


def test_tracker_metrics_summarise_routing_over_layers():
    summary = {
        "lm_loss": 2.0,
        "balance_loss": 1.5,
        "contrastive_loss": 0.25,
        "tokens_per_s": 100.0,
        "expert_load": {"a": [0.25, 0.25, 0.25, 0.25], "b": [1.0, 0.0, 0.0, 0.0]},
    }
    metrics = tracker_metrics(summary)
    assert metrics["lm_loss"] == 2.0 and metrics["contrastive_loss"] == 0.25
    assert metrics["routing/max_load"] == pytest.approx((1.0 + 4.0) / 2)  # uniform 1, collapsed N
    assert metrics["routing/entropy"] == pytest.approx(0.5)
    assert [metrics[f"routing/expert_{i}"] for i in range(4)] == pytest.approx([0.625, 0.125, 0.125, 0.125])
    assert not any(k.startswith("routing/") for k in tracker_metrics({**summary, "expert_load": {}}))


@pytest.mark.slow
def test_tensorboard_receives_losses_and_routing_and_the_card_the_run(chat_model_dir, data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = recipe_for(
        chat_model_dir, data_dir, tmp_path, train={"max_steps": 2, "report_to": "tensorboard"}, eval={"limit": 2}
    )
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in run_dir.rglob("*"))
    assert not (run_dir / "checkpoints" / "runs").exists()  # not Trainer's default place
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    expected = {"train/loss", "train/learning_rate", "train/lm_loss", "train/balance_loss", "train/contrastive_loss"}
    assert expected | {"train/routing/max_load", "train/routing/expert_0", "train/tokens_per_s"} <= tags
    steps = [e.step for e in accumulator.Scalars("train/lm_loss")]
    assert steps == [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    lm = [e.value for e in accumulator.Scalars("train/lm_loss")]
    assert lm == pytest.approx([r["lm_loss"] for r in read_jsonl(run_dir / "metrics.jsonl")], rel=1e-6)

    from huggingface_hub import ModelCard

    card = ModelCard.load(run_dir / "adapter" / "README.md")
    assert card.data.eval_results[0].metric_type == "accuracy"
    assert "## Recipe" in card.text and "report_to: tensorboard" in card.text
    assert "run: 2 optimizer steps, final training loss" in card.text


# ------------------------------------------------------------------------------------------ optimizers


@pytest.mark.slow
def test_8bit_adamw_trains_the_tiny_model(chat_model_dir, data_dir, tmp_path):
    # r=64 on 64-wide layers: every A has >= 4096 elements, bitsandbytes' threshold for 8-bit state
    recipe = recipe_for(
        chat_model_dir,
        data_dir,
        tmp_path,
        method="lora",
        adapter={"r": 64, "alpha": 64, "dropout": 0.0},
        train={"max_steps": 3, "optim": "adamw_bnb_8bit", "checkpoint_steps": 3},
        eval={"enabled": False},
    )
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    from safetensors.torch import load_file

    weights = load_file(run_dir / "adapter" / "adapter.safetensors")
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in weights.items())  # B left zero init
    assert all(v.dtype == torch.float32 for v in weights.values())
    from qmoe.checkpoints import load_training_state

    # read as --resume reads it (torch's weights-only unpickler); the moments of the large tensors are 8-bit
    # (bitsandbytes keeps tensors under 4096 elements, here k/v_proj's B, in 32-bit)
    state = load_training_state(run_dir / "checkpoints" / "checkpoint-3" / "optimizer.pt")["state"]
    dtypes = [s["__bnb_optimizer_quant_state__"]["state1"].dtype for s in state.values()]
    assert dtypes.count(torch.uint8) > len(dtypes) / 2


# ------------------------------------------------------------------------------------------ adapter dtype


def test_adapter_weights_in_float32_over_a_bf16_backbone(tiny_4bit):
    model = qmoe.attach(tiny_4bit(compute_dtype=torch.bfloat16), qmoe.AdapterConfig(method="moelora", r=2))
    layers = qmoe.adapter_layers(model).values()
    assert {layer.lora_A.dtype for layer in layers} == {torch.bfloat16}  # the compute dtype, before
    cast_adapter(model, torch.float32)
    assert {getattr(layer, n).dtype for layer in layers for n in layer.adapter_param_names} == {torch.float32}
    ids = torch.arange(3, 19).reshape(2, 8)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.dtype == torch.bfloat16  # the backbone still computes in bf16
    (out.loss + qmoe.aux_loss(model)).backward()
    grads = [layer.lora_A.grad for layer in layers]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------ attention


def test_attn_implementation_eager_and_sdpa_both_load_with_the_same_outputs(chat_model_dir):
    outputs = {}
    ids = torch.arange(3, 19).reshape(2, 8)
    for name in ("eager", "sdpa"):
        model, _, _ = load_base_model(str(chat_model_dir), "nf4", "float32", "cpu", attn_implementation=name)
        assert model.config._attn_implementation == name
        with torch.no_grad():
            outputs[name] = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-4, atol=1e-4)


def test_flash_attention_is_refused_clearly_where_it_cannot_run(chat_model_dir):
    with pytest.raises(UsageError, match=r"model.attn_implementation=flash_attention_2 needs a CUDA GPU"):
        load_base_model(str(chat_model_dir), "nf4", "float32", "cpu", attn_implementation="flash_attention_2")
