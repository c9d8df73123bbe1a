"""PEFT-native methods (issue 14): MoELoRA, LoRACoE and LoRAMoE registered with PEFT, every qmoe folder loadable
by ``PeftModel.from_pretrained`` with identical logits, ``get_peft_model`` with qmoe's configs, old folders still
loading in qmoe, and PEFT LoRA folders qmoe cannot represent refused naming the key. Real NF4 layers, real PEFT."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.utils.warning import PeftWarning
from safetensors.torch import load_file, save_file

import qmoe
import qmoe.peft_integration as pi
from qmoe.config import AdapterConfig
from qmoe.io import atomic_write_json
from qmoe.testing import load_model

MIXTURES = ["moelora", "loracoe", "loramoe"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def config(method, **kw):
    kw.setdefault("dropout", 0.0)
    kw.setdefault("init_lora_weights", False)  # B random: outputs differ from the base
    return AdapterConfig(method=method, **kw)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the routing masks it
    return ids, mask


def logits(model):
    ids, mask = batch()
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def trained_like(tiny_4bit, method, **kw):
    model = qmoe.attach(tiny_4bit(), config(method, **kw))
    if method == "loracoe":  # a non-zero router, so the composition is not uniform
        with torch.no_grad():
            for layer in qmoe.adapter_layers(model).values():
                layer.router.normal_(0, 0.3)
    return model


# ---------------------------------------------------------------------------------------------------------
# qmoe folder <-> PEFT


@pytest.mark.parametrize("method", MIXTURES)
def test_peft_loads_a_qmoe_folder_with_identical_logits_and_back(tiny_4bit, tmp_path, method):
    model = trained_like(tiny_4bit, method)
    expected = logits(model)
    qmoe.save_adapter(model, tmp_path / "qmoe")
    raw = json.loads((tmp_path / "qmoe" / "adapter_config.json").read_text())
    assert raw["peft_type"] == method.upper() and "qmoe" not in raw

    peft_model = PeftModel.from_pretrained(tiny_4bit(), str(tmp_path / "qmoe"))
    assert isinstance(peft_model.peft_config["default"], pi.CONFIG_CLASSES[method])
    assert not any(p.requires_grad for p in peft_model.parameters())  # inference mode by default
    assert torch.equal(logits(peft_model), expected)
    # the routing telemetry is qmoe's, through the PeftModel too
    assert qmoe.expert_load(peft_model)

    # a folder PEFT writes loads in qmoe, with the same logits
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert not (tmp_path / "peft" / "adapter.safetensors").exists()
    back = qmoe.load_adapter(tiny_4bit(), tmp_path / "peft")
    assert qmoe.adapter_config(back) == qmoe.adapter_config(model)
    assert torch.equal(logits(back), expected)
    # and PEFT reloads its own folder
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_4bit(), str(tmp_path / "peft"))), expected)


@pytest.mark.parametrize("method", MIXTURES)
def test_get_peft_model_builds_what_attach_builds_and_trains(tiny_4bit, method):
    cfg = config(method, target_modules=TARGETS)
    torch.manual_seed(3)
    direct = qmoe.attach(tiny_4bit(), cfg)
    torch.manual_seed(3)
    peft_model = get_peft_model(tiny_4bit(), pi.peft_config(cfg))
    assert qmoe.adapter_config(peft_model) == cfg
    assert qmoe.trainable_parameters(peft_model) == qmoe.trainable_parameters(direct)

    # train first: on CPU, bitsandbytes repacks 4-bit weights for inference at the first eval()
    peft_model.train()
    ids, mask = batch()
    out = peft_model(input_ids=ids, attention_mask=mask, labels=ids)
    (out.loss + qmoe.aux_loss(peft_model)).backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "router") for n in grads)
    if method == "moelora":
        assert qmoe.aux_loss(peft_model) > 0
    assert torch.equal(logits(peft_model), logits(direct))


def test_peft_model_disable_unload_and_what_it_refuses(tiny_4bit):
    base_logits = logits(tiny_4bit())
    peft_model = get_peft_model(tiny_4bit(), pi.peft_config(config("moelora")))
    adapted = logits(peft_model)
    assert not torch.equal(adapted, base_logits)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base_logits)
    assert torch.equal(logits(peft_model), adapted)

    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_and_unload()
    with pytest.raises(ValueError, match="holds one adapter"):
        peft_model.add_adapter("second", pi.peft_config(config("moelora")))

    base = peft_model.unload()
    assert qmoe.adapter_config(base) is None and not qmoe.adapter_layers(base)
    assert torch.equal(logits(base), base_logits)
    qmoe.attach(base, config("loramoe"))  # a fresh adapter attaches to the unloaded model


def test_peft_refuses_a_folder_missing_adapter_tensors(tiny_4bit, tmp_path):
    qmoe.save_adapter(trained_like(tiny_4bit, "loramoe"), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(str(weights))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(qmoe.AdapterError, match="missing") as err:
        PeftModel.from_pretrained(tiny_4bit(), str(tmp_path / "a"))
    assert dropped in str(err.value)


@pytest.mark.parametrize("method", MIXTURES)
def test_peft_config_carries_every_adapter_config_field(method):
    non_default = {
        "moelora": {"r": 2, "num_experts": 4, "top_k": 1, "balance_loss_weight": 0.5, "contrastive_samples": 8},
        "loracoe": {"r": 8, "num_experts": 3, "composition_scale": "paper", "stage": "warmup"},
        "loramoe": {"r": 8, "num_experts": 2, "alpha": 4.0},
    }[method]
    cfg = AdapterConfig(method=method, target_modules="all-linear", dropout=0.1, **non_default)
    assert pi.peft_config(cfg).to_qmoe() == cfg
    # a field AdapterConfig gains must reach the PEFT config of every method that uses it
    carried = set(pi.CONFIG_CLASSES[method]._qmoe_fields())
    unused = {name for name, value in cfg.to_dict().items() if value is None}
    assert set(AdapterConfig.model_fields) - {"method"} == carried | unused, "add it to qmoe/peft_integration.py"


def test_peft_config_errors_name_the_field():
    with pytest.raises(ValueError, match="top_k"):
        pi.MoELoraConfig(num_experts=2, top_k=3)


def test_register_is_idempotent_and_keeps_peft_methods():
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    from qmoe.hf_private import register_peft_type

    pi.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MOELORA"] is pi.MoELoraConfig
    with pytest.raises(ValueError, match="already has a method 'LORA'"):
        register_peft_type("LORA", pi.MoELoraConfig, pi.MoELoraModel, "moelora_")


# ---------------------------------------------------------------------------------------------------------
# back-compat: folders written before this change


@pytest.mark.parametrize("method", MIXTURES)
def test_folder_of_the_old_qmoe_schema_still_loads(tiny_4bit, tmp_path, method):
    model = trained_like(tiny_4bit, method)
    expected = logits(model)
    qmoe.save_adapter(model, tmp_path / "new")
    # what save_adapter wrote before: the AdapterConfig under "qmoe", adapter.safetensors only
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter.safetensors").write_bytes((tmp_path / "new" / "adapter.safetensors").read_bytes())
    cfg = qmoe.adapter_config(model)
    atomic_write_json(old / "adapter_config.json", {"qmoe": cfg.to_dict(), "base_model_name_or_path": None})
    loaded = qmoe.load_adapter(tiny_4bit(), old)
    assert qmoe.adapter_config(loaded) == cfg
    assert torch.equal(logits(loaded), expected)


# ---------------------------------------------------------------------------------------------------------
# PEFT LoRA folders qmoe cannot represent are refused, naming the key


@pytest.fixture(scope="module")
def fp32_base(tiny_dir):
    return lambda: load_model(tiny_dir, quantization="none")


def peft_folder(base, path, peft_cfg):
    with warnings.catch_warnings():
        # lora_bias=True on the bias-free tiny Llama: PEFT warns on creating and (mistaking the bias vectors for
        # unsharded tensors) on saving; the folder is still what such a run writes
        warnings.filterwarnings("ignore", category=PeftWarning)
        peft_model = get_peft_model(base, peft_cfg)
        peft_model.save_pretrained(str(path))
    return path


REFUSED = {
    "use_dora": (LoraConfig(target_modules=TARGETS, use_dora=True), "use_dora=True"),
    "modules_to_save": (LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head"]), "modules_to_save="),
    "bias_all": (LoraConfig(target_modules=TARGETS, bias="all"), "bias='all'"),
    "bias_lora_only": (LoraConfig(target_modules=TARGETS, bias="lora_only"), "bias='lora_only'"),
    "rank_pattern": (LoraConfig(target_modules=TARGETS, rank_pattern={"q_proj": 4}), "rank_pattern="),
    "alpha_pattern": (LoraConfig(target_modules=TARGETS, alpha_pattern={"v_proj": 32}), "alpha_pattern="),
    "layers_to_transform": (
        LoraConfig(target_modules=TARGETS, layers_to_transform=[0], layers_pattern="layers"),
        "layers_(to_transform|pattern)=",
    ),
    "exclude_modules": (LoraConfig(target_modules=TARGETS, exclude_modules=["down_proj"]), "exclude_modules="),
    "lora_bias": (LoraConfig(target_modules=TARGETS, lora_bias=True), "lora_bias=True"),
    "pissa": (LoraConfig(target_modules=TARGETS, init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    "ia3": (IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]), "peft_type='IA3'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_peft_folder_with_what_qmoe_cannot_represent_is_refused(fp32_base, tmp_path, case):
    peft_cfg, key = REFUSED[case]
    folder = peft_folder(fp32_base(), tmp_path / case, peft_cfg)
    with pytest.raises(qmoe.AdapterError, match="adapter_config.json: " + key) as err:
        qmoe.read_adapter_config(folder)
    assert "\n" not in str(err.value)
    base = fp32_base()
    with pytest.raises(qmoe.AdapterError):
        qmoe.load_adapter(base, folder)
    assert qmoe.adapter_config(base) is None  # refused before anything was attached


def test_peft_lora_tensors_without_a_place_in_the_model_are_refused(fp32_base, tmp_path):
    folder = peft_folder(fp32_base(), tmp_path / "lora", LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    only_q = config("lora", r=8, alpha=16, target_modules=["q_proj"])
    with pytest.raises(qmoe.AdapterError, match=r"tensor '.*(v_proj|down_proj)\.lora_A\.weight' has no place"):
        qmoe.load_adapter(fp32_base(), folder, config=only_q)


def test_plain_peft_lora_folder_still_loads_with_identical_logits(fp32_base, tmp_path):
    peft_model = get_peft_model(fp32_base(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "lora"))
    loaded = qmoe.load_adapter(fp32_base(), tmp_path / "lora")
    torch.testing.assert_close(logits(loaded), logits(peft_model), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# lm-evaluation-harness through the PEFT route


@pytest.mark.slow
def test_lm_eval_runs_on_a_qmoe_adapter_through_peft(chat_model_dir, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    model = qmoe.attach(load_model(chat_model_dir, quantization="none"), config("moelora"))
    qmoe.save_adapter(model, tmp_path / "adapter")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    docs = [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0} for a, b in
            [(1, 2), (3, 4), (5, 6), (7, 8)]]  # fmt: skip
    (task_dir / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task_dir / "qmoe_tiny.yaml").write_text(
        "task: qmoe_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {task_dir / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "results"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "qmoe.lm_eval", "--model", "hf",
           "--model_args", f"pretrained={chat_model_dir},peft={tmp_path / 'adapter'},dtype=float32",
           "--tasks", "qmoe_tiny", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "2",
           "--output_path", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert results and 0.0 <= results[0]["results"]["qmoe_tiny"]["acc,none"] <= 1.0
    assert results[0]["config"]["model_args"]["peft"] == str(tmp_path / "adapter")  # through PeftModel.from_pretrained


def test_detach_gives_the_base_model_back(tiny_4bit):
    base_logits = logits(tiny_4bit())
    model = trained_like(tiny_4bit, "moelora")
    assert not torch.equal(logits(model), base_logits)
    qmoe.detach(model)
    assert qmoe.adapter_config(model) is None and torch.equal(logits(model), base_logits)
    with pytest.raises(ValueError, match="no qmoe adapter"):
        qmoe.detach(model)
