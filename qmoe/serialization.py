"""save_adapter / load_adapter: small files holding only adapter tensors.

Folder layout: every folder is a PEFT folder. ``adapter_config.json`` is a PEFT config: PEFT's LoraConfig for
``lora``, qmoe's registered PEFT method (``peft_type`` MOELORA / LORACOE / LORAMOE, the AdapterConfig fields at
the top level; see qmoe/peft_integration.py) for the mixtures. ``adapter_model.safetensors`` holds PEFT key
names (``base_model.model.<module name>.<param>``), so ``peft.PeftModel.from_pretrained`` loads the folder
(after ``import qmoe.peft_integration`` for the mixtures). ``adapter.safetensors`` holds the same tensors under
qmoe's names (``<module name>.<param>``), which checkpoints and resume read.

Read as well: folders of the earlier qmoe schema (the AdapterConfig under a ``qmoe`` key, ``adapter.safetensors``
only), folders written by ``PeftModel.save_pretrained`` (no ``adapter.safetensors``), and PEFT LoRA folders,
refused with an error naming the key when they use anything qmoe's LoRA does not represent (DoRA,
``modules_to_save``, bias training, rank/alpha patterns, ...), never loaded with a silent difference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .attach import adapter_config, adapter_layers, attach
from .config import METHODS as METHOD_NAMES
from .config import AdapterConfig
from .io import atomic_write_bytes, atomic_write_json
from .tuners.base import AdapterLayer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded: missing, corrupt, or not matching the model."""


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model).items():
        for param in layer.adapter_param_names:
            state[f"{name}.{param}"] = getattr(layer, param).detach().to("cpu").contiguous()
    return state


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter of ``model`` into ``directory`` (each file replaced atomically), with a model card
    (README.md, see ``qmoe.modelcard``) unless the folder holds a README of your own."""
    config = adapter_config(model)
    if config is None:
        raise ValueError("no qmoe adapter attached to this model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model)
    atomic_write_bytes(directory / WEIGHTS_FILE, save(state, metadata={"format": "qmoe"}))
    if config.method == "lora":
        peft_state = {
            _PEFT_PREFIX + key.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight"): t
            for key, t in state.items()
        }
        # a plain PEFT LoraConfig (PEFT warns on foreign keys); read_adapter_config rebuilds ours from it
        meta = _peft_config_dict(model, config)
    else:
        from .peft_integration import peft_config

        peft_state = {_PEFT_PREFIX + key: t for key, t in state.items()}
        meta = _jsonable(peft_config(config, base_model_name_or_path=_base_name(model)).to_dict())
    atomic_write_bytes(directory / PEFT_WEIGHTS_FILE, save(peft_state, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, meta)
    from .modelcard import CARD_FILE, is_generated, write_model_card

    if not (directory / CARD_FILE).exists() or is_generated(directory / CARD_FILE):
        write_model_card(directory, config, _base_name(model))
    return directory


def _base_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or None


def _peft_config_dict(model: nn.Module, config: AdapterConfig) -> dict[str, Any]:
    from peft import LoraConfig

    names = list(adapter_layers(model))
    if isinstance(config.target_modules, list) and config.target_modules != ["all-linear"]:
        targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    else:  # regex / all-linear: name the adapted modules exactly
        targets = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"
    peft_cfg = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=_base_name(model),
    )
    return _jsonable(peft_cfg.to_dict())


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def read_adapter_config(directory: str | Path) -> tuple[AdapterConfig, bool, dict[str, Any]]:
    """(config, is_peft_only, raw json) of an adapter folder; AdapterError naming the file when unusable."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise AdapterError(f"adapter folder not found: {directory}")
    if not path.is_file():
        raise AdapterError(f"{path} is missing: not an adapter folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is corrupt or truncated ({exc})") from None
    if "qmoe" in raw:  # the earlier qmoe schema (before mixtures were PEFT methods)
        try:
            return AdapterConfig(**raw["qmoe"]), False, raw
        except ValueError as exc:
            raise AdapterError(f"{path}: invalid qmoe adapter config: {exc}") from None
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type.lower() in METHOD_NAMES and peft_type != "LORA":
        values = {k: raw[k] for k in AdapterConfig.model_fields if k in raw and k != "method"}
        try:
            cfg = AdapterConfig(method=peft_type.lower(), **values)
        except ValueError as exc:
            raise AdapterError(f"{path}: invalid {peft_type} adapter config: {exc}") from None
        # PeftModel.save_pretrained writes adapter_model.safetensors only
        return cfg, not (directory / WEIGHTS_FILE).is_file(), raw
    if peft_type == "LORA":
        _check_representable_lora(raw, path)
        targets = raw.get("target_modules") or ["q_proj", "v_proj"]
        if isinstance(targets, (set, tuple)):
            targets = list(targets)
        cfg = AdapterConfig(
            method="lora",
            r=raw["r"],
            alpha=raw.get("lora_alpha", raw["r"]),
            dropout=raw.get("lora_dropout", 0.0),
            target_modules=targets,
        )
        # qmoe's own lora folders carry adapter.safetensors beside PEFT's file
        return cfg, not (directory / WEIGHTS_FILE).is_file(), raw
    if peft_type:
        valid = ", ".join(m.upper() for m in METHOD_NAMES)
        raise AdapterError(f"{path}: peft_type={raw['peft_type']!r} is not supported: qmoe loads {valid}")
    raise AdapterError(f"{path} is neither a qmoe adapter nor a PEFT adapter (no peft_type)")


# LoraConfig keys qmoe's lora represents, or that only shape initialisation / bookkeeping (no effect on a load)
_LORA_KEYS_REPRESENTED = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size",
    "ensure_weight_tying",
}  # fmt: skip
# initialisations that leave the base weights as they were (others, such as PiSSA, rewrite them)
_LORA_INITS_KEEPING_BASE = (True, False, "gaussian", "eva", "orthogonal")


def _check_representable_lora(raw: dict[str, Any], path: Path) -> None:
    """AdapterError naming the first LoraConfig key whose value qmoe's lora cannot represent exactly.

    Any key outside :data:`_LORA_KEYS_REPRESENTED` must hold PEFT's default (or, for keys this PEFT does not
    know, an empty value): DoRA, modules_to_save, bias, rank/alpha patterns, layers_to_transform and the
    like change the function the adapter computes."""
    from peft import LoraConfig

    defaults = _jsonable(LoraConfig().to_dict())
    init = raw.get("init_lora_weights", True)
    if init not in _LORA_INITS_KEEPING_BASE:
        raise AdapterError(
            f"{path}: init_lora_weights={init!r} rewrites the base model's weights, so this adapter only "
            "matches PEFT's modified base; qmoe loads LoRA folders whose base is unchanged "
            f"({', '.join(map(repr, _LORA_INITS_KEEPING_BASE))}; PEFT can convert it to a plain LoRA on saving)"
        )
    for key, value in raw.items():
        if key in _LORA_KEYS_REPRESENTED:
            continue
        default = defaults.get(key)
        unchanged = value == default if key in defaults else value in (None, False, {}, [], "")
        if not unchanged:
            raise AdapterError(
                f"{path}: {key}={value!r} is not supported: qmoe's lora has no equivalent, so loading would "
                f"change the adapter's outputs (PEFT's default is {default!r})"
            )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path} is corrupt or truncated ({exc})") from None


def load_adapter(
    model: nn.Module, directory: str | Path, config: AdapterConfig | None = None, *, revision: str | None = None
) -> nn.Module:
    """Load an adapter folder into ``model`` (attaching the folder's config first if needed).

    ``directory`` may also be a hub repo id (``owner/name``, at ``revision``) that is not a local path: it is
    downloaded into the hub cache (or found there when ``HF_HUB_OFFLINE`` is set; see ``qmoe.hub``).
    A PEFT LoRA folder loads into a ``lora`` model, or warm-starts the LoRA part of a ``loracoe`` model
    (LoRACoE's upcycling of an existing LoRA); pass ``config`` to attach LoRACoE to a bare model first.
    """
    if not isinstance(directory, Path) or revision is not None:
        from .hub import resolve_adapter_path

        directory = resolve_adapter_path(directory, revision)
    directory = Path(directory)
    folder_cfg, peft_only, raw = read_adapter_config(directory)
    if adapter_config(model) is None:
        attach(model, config or folder_cfg)
    current = adapter_config(model)
    layers = adapter_layers(model)
    if peft_only and folder_cfg.method == "lora":
        _load_peft(layers, current, raw, _load_tensors(directory / PEFT_WEIGHTS_FILE), directory)
        return model
    if folder_cfg.method != current.method:
        raise AdapterError(f"{directory} holds a {folder_cfg.method} adapter but the model has {current.method}")
    weights = directory / (PEFT_WEIGHTS_FILE if peft_only else WEIGHTS_FILE)
    state = _load_tensors(weights)
    if peft_only:
        state = {k.removeprefix(_PEFT_PREFIX): v for k, v in state.items()}
    expected = {f"{n}.{p}": (layer, p) for n, layer in layers.items() for p in layer.adapter_param_names}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"{weights} does not match this model: missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
        )
    for key, (layer, param) in expected.items():
        _copy_into(getattr(layer, param), state[key], key, weights)
    return model


def _copy_into(param: torch.Tensor, value: torch.Tensor, key: str, path: Path) -> None:
    if param.shape != value.shape:
        raise AdapterError(
            f"{path}: layer {key} has shape {tuple(value.shape)} in the file but {tuple(param.shape)} in the model "
            "(different base model or adapter config?)"
        )
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _load_peft(
    layers: dict[str, AdapterLayer],
    current: AdapterConfig,
    raw: dict[str, Any],
    state: dict[str, torch.Tensor],
    directory: Path,
) -> None:
    if current.method not in ("lora", "loracoe"):
        raise AdapterError(f"a PEFT LoRA adapter can load into lora or loracoe models, not {current.method}")
    r = raw["r"]
    alpha = raw.get("lora_alpha", r)
    peft_scale = alpha / math.sqrt(r) if raw.get("use_rslora") else alpha / r
    path = directory / PEFT_WEIGHTS_FILE
    found = 0
    used: set[str] = set()
    for name, layer in layers.items():
        key_a, key_b = f"{_PEFT_PREFIX}{name}.lora_A.weight", f"{_PEFT_PREFIX}{name}.lora_B.weight"
        if key_a not in state:  # PEFT versions that keep the adapter name in keys
            key_a, key_b = key_a.replace(".weight", ".default.weight"), key_b.replace(".weight", ".default.weight")
        if key_a not in state:
            continue
        found += 1
        used.update((key_a, key_b))
        _copy_into(layer.lora_A, state[key_a], f"{name}.lora_A", path)
        # keep the warm-started function identical even if our alpha/r differs from the PEFT one
        _copy_into(layer.lora_B, state[key_b] * (peft_scale / layer.scale), f"{name}.lora_B", path)
    if found == 0:
        raise AdapterError(f"{path} holds no LoRA weights for this model's adapted layers")
    unused = sorted(set(state) - used)
    if unused:  # e.g. DoRA magnitudes, modules_to_save copies, LoRA of modules qmoe did not adapt
        raise AdapterError(
            f"{path}: tensor {unused[0]!r} has no place in this model's {current.method} adapter"
            f"{f' (and {len(unused) - 1} more)' if len(unused) > 1 else ''}: loading would drop it"
        )
