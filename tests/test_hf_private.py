"""Every private name of another library that qmoe relies on (the inventory in qmoe/hf_private.py) is still
there, with the parameters qmoe passes, and still used the way qmoe assumes. A failure names the attribute and
the installed transformers version: read qmoe/hf_private.py for what breaks and adapt it there."""

import inspect
import re
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PrinterCallback, ProgressCallback, Trainer, TrainingArguments

from qmoe import hf_private
from qmoe.hf_private import TRAINER_STATE_FILE, TRAINING_STATE_FILES, TrainerHooks

VERSION = hf_private.TRANSFORMERS_VERSION
REPO = Path(__file__).resolve().parents[1]

# Trainer's private methods qmoe overrides or calls: name -> the parameters after self, in order
TRAINER_METHODS = {
    "_get_train_sampler": ("train_dataset",),
    "_save": ("output_dir", "state_dict"),
    "_save_checkpoint": ("model", "trial"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_save_optimizer_and_scheduler": ("output_dir",),
    "_save_scaler": ("output_dir",),
    "_save_rng_state": ("output_dir",),
}
OVERRIDDEN = ("_get_train_sampler", "_save", "_save_checkpoint", "_load_from_checkpoint")


def broken(what: str) -> str:
    return f"transformers {VERSION}: {what}; qmoe/hf_private.py relies on it (see its docstring for what breaks)"


@pytest.mark.parametrize("name", list(TRAINER_METHODS))
def test_trainer_private_method_keeps_its_signature(name):
    method = getattr(Trainer, name, None)
    assert callable(method), broken(f"Trainer.{name} no longer exists")
    params = tuple(inspect.signature(method).parameters)[1:]
    assert params == TRAINER_METHODS[name], broken(
        f"Trainer.{name} now takes {params}, qmoe expects {TRAINER_METHODS[name]}"
    )


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_trainer_still_calls_the_methods_qmoe_overrides(name):
    # an override of a method Trainer stopped calling would be silently dead
    assert re.search(rf"self\.{name}\b", inspect.getsource(Trainer)), broken(f"Trainer no longer calls self.{name}")
    assert name in vars(TrainerHooks), f"qmoe.hf_private.TrainerHooks no longer overrides {name}"


def test_trainer_reads_the_attributes_qmoe_sets():
    from transformers.trainer_utils import validate_quantization_for_training

    assert "_hf_peft_config_loaded" in inspect.getsource(validate_quantization_for_training), broken(
        "validate_quantization_for_training no longer reads model._hf_peft_config_loaded"
    )
    source = inspect.getsource(Trainer)
    assert "self.model_accepts_loss_kwargs = " in source and "if self.model_accepts_loss_kwargs" in source, broken(
        "Trainer no longer sets and reads self.model_accepts_loss_kwargs"
    )


def test_trainer_adds_the_log_printers_qmoe_removes():
    from transformers import trainer as trainer_module

    assert hasattr(trainer_module, "DEFAULT_PROGRESS_CALLBACK"), broken(
        "transformers.trainer.DEFAULT_PROGRESS_CALLBACK no longer exists"
    )
    assert "PrinterCallback if self.args.disable_tqdm else DEFAULT_PROGRESS_CALLBACK" in inspect.getsource(
        Trainer.__init__
    ), broken("Trainer.__init__ no longer adds PrinterCallback / DEFAULT_PROGRESS_CALLBACK")


def test_trainer_file_names_match_the_ones_checkpoints_verify():
    from transformers import trainer as trainer_module

    assert trainer_module.TRAINER_STATE_NAME == TRAINER_STATE_FILE, broken("TRAINER_STATE_NAME changed")
    for constant in ("OPTIMIZER_NAME", "SCHEDULER_NAME"):
        assert getattr(trainer_module, constant, None) in TRAINING_STATE_FILES, broken(f"{constant} changed")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.linear(x)
        return {"loss": ((out.squeeze(-1) - labels) ** 2).mean(), "logits": out}


class _Hooks(TrainerHooks):
    asked_for_sampler = False

    def train_sampler(self, dataset):
        type(self).asked_for_sampler = True
        return torch.utils.data.SequentialSampler(dataset)


def test_the_private_writers_write_the_files_resume_reads(tmp_path):
    data = [{"x": torch.randn(4), "labels": torch.tensor(0.0)} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1)
    trainer = _Hooks(model=_Tiny(), args=args, train_dataset=data)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.save_training_state(tmp_path)
    for name in (*TRAINING_STATE_FILES, TRAINER_STATE_FILE):
        assert (tmp_path / name).is_file(), broken(f"Trainer's private writers no longer write {name}")

    trainer.get_train_dataloader()
    assert _Hooks.asked_for_sampler, broken("get_train_dataloader no longer asks _get_train_sampler")

    hf_private.remove_log_printers(trainer)
    printers = (ProgressCallback, PrinterCallback, transformers.trainer.DEFAULT_PROGRESS_CALLBACK)
    assert not [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, printers)]


def test_other_libraries_private_names():
    current = getattr(torch._C, "_current_graph_task_id", None)
    assert callable(current), (
        f"torch {torch.__version__}: torch._C._current_graph_task_id is gone (qmoe/tuners/base.py)"
    )
    assert current() == -1, f"torch {torch.__version__}: _current_graph_task_id() outside backward is not -1"
    config = PretrainedConfig(name_or_path="some/model")
    assert getattr(config, "_name_or_path", None) == "some/model", broken(
        "PretrainedConfig._name_or_path is gone (qmoe/serialization.py)"
    )


def test_bitsandbytes_private_names():
    """What qmoe/kernels/bnb_cpu.py reads of bitsandbytes (its inventory is in qmoe/hf_private.py)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from qmoe.kernels import bnb_cpu

    where = f"bitsandbytes {bnb.__version__}"
    assert callable(getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)), broken(
        f"{where}: functional._convert_weight_packed_for_cpu_inverse is gone (qmoe/kernels/bnb_cpu.py)"
    )
    if not bnbf.has_avx512bf16():
        pytest.skip("no AVX512-BF16: bitsandbytes has no fused CPU kernel here (the rest is not read)")
    from bitsandbytes.backends.cpu import ops

    assert hasattr(ops, "gemm_4bit_forward_kernel"), broken(
        f"{where}: backends.cpu.ops.gemm_4bit_forward_kernel is gone (qmoe/kernels/bnb_cpu.py)"
    )
    for quant_type, symbol in bnb_cpu.GEMV_SYMBOLS.items():
        assert bnb_cpu.kernel_address(quant_type), broken(f"{where}: its C library has no {symbol}")
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4").to("cpu")
    layer.eval()
    with torch.no_grad():
        layer(torch.zeros(1, 128))
    state = layer.weight.quant_state
    assert getattr(state, "packing_format_for_cpu", False), broken(
        f"{where}: an eval forward no longer sets QuantState.packing_format_for_cpu"
    )
    assert state.absmax.dtype == torch.bfloat16 and tuple(state.absmax.shape) == (128 // state.blocksize, 64), broken(
        f"{where}: the packed absmax is no longer bf16 [in / blocksize, out]"
    )
    assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (64, 64), broken(
        f"{where}: the packed weight is no longer uint8 [out, in / 2]"
    )


def test_installed_transformers_is_the_tested_range():
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    requirement = Requirement(next(d for d in deps if d.startswith("transformers")))
    assert requirement.specifier.contains(VERSION), (
        f"transformers {VERSION} is installed but pyproject.toml tests {requirement.specifier}: run this file "
        "against the new version, adapt qmoe/hf_private.py, then move the range"
    )


# ---- PEFT (qmoe.peft_integration) ---------------------------------------------------------------------------


def peft_broken(what: str) -> str:
    import peft

    return f"peft {peft.__version__}: {what}; qmoe/hf_private.py relies on it (see its docstring for what breaks)"


def test_peft_register_method_still_refuses_methods_outside_its_enum():
    from peft import PeftConfig
    from peft.utils import register_peft_method

    # if this ever registers, PEFT opened its extension point: call it from register_peft_type instead
    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(name="qmoeprobe", config_cls=PeftConfig, model_cls=hf_private.PeftTunerHooks)


def test_peft_register_method_writes_the_dicts_qmoe_writes():
    from peft.utils import register_peft_method

    source = inspect.getsource(register_peft_method)
    for name, value in (
        ("PEFT_TYPE_TO_CONFIG_MAPPING", "config_cls"),
        ("PEFT_TYPE_TO_TUNER_MAPPING", "model_cls"),
        ("PEFT_TYPE_TO_PREFIX_MAPPING", "prefix"),
    ):
        assert f"{name}[peft_type] = {value}" in source, peft_broken(f"register_peft_method no longer sets {name}")
    writes = set(re.findall(r"(PEFT_TYPE_TO_\w+)\[peft_type\] =", source))
    # the mixed-model dict only for is_mixed_compatible methods, which qmoe's are not
    known = {"CONFIG", "TUNER", "PREFIX", "MIXED_MODEL"}
    assert writes <= {f"PEFT_TYPE_TO_{k}_MAPPING" for k in known}, peft_broken(f"register_peft_method writes {writes}")


def test_peft_tuner_private_hooks_keep_their_signature_and_callers():
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils import save_and_load

    remap = inspect.signature(BaseTuner._remap_adapter_state_dict_for_load)
    assert tuple(remap.parameters) == ("model", "config", "adapter_name", "state_dict"), peft_broken(
        f"BaseTuner._remap_adapter_state_dict_for_load now takes {tuple(remap.parameters)}"
    )
    assert "tuner_cls._remap_adapter_state_dict_for_load(" in inspect.getsource(
        save_and_load.set_peft_model_state_dict
    ), peft_broken("set_peft_model_state_dict no longer calls the tuner's _remap_adapter_state_dict_for_load")
    assert "_create_and_replace" in BaseTuner.__abstractmethods__, peft_broken(
        "BaseTuner._create_and_replace is no longer the abstract method qmoe stubs"
    )
    assert not (BaseTuner.__abstractmethods__ - set(vars(hf_private.PeftTunerHooks))), peft_broken(
        f"BaseTuner has new abstract methods {sorted(BaseTuner.__abstractmethods__)}"
    )
