"""attach(): wrap a model's linear layers with adapters and freeze everything else."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .kernels import requested_backend
from .tuners import layer_class
from .tuners.base import AdapterContext, AdapterLayer

_CONTEXT_ATTR = "_qmoe_context"
_CONFIG_ATTR = "_qmoe_config"
_HOOK_ATTR = "_qmoe_mask_hook"


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear, so this covers 4-bit backbones too
    return isinstance(module, nn.Linear) and not isinstance(module, AdapterLayer)


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _output_layer_names(model: nn.Module) -> set[str]:
    """The LM head (never adapted by 'all-linear', as in PEFT)."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    return names


def target_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the linear modules the config selects; ValueError when a pattern matches nothing."""
    linear = [n for n, m in model.named_modules() if _is_linear(m)]
    targets = config.target_modules
    if targets == "all-linear" or targets == ["all-linear"]:
        head = _output_layer_names(model)
        return [n for n in linear if n not in head]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if isinstance(targets, str):
        chosen = [n for n in linear if _matches(n, targets)]
        if not chosen:
            raise ValueError(
                f"AdapterConfig.target_modules={targets!r} matches no linear module; valid names: {suffixes} "
                "or 'all-linear'"
            )
        return chosen
    for t in targets:
        if not any(_matches(n, [t]) for n in linear):
            raise ValueError(
                f"AdapterConfig.target_modules entry {t!r} matches no linear module; valid names: {suffixes} "
                "or 'all-linear'"
            )
    return [n for n in linear if _matches(n, targets)]


def _capture_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    ctx: AdapterContext = getattr(module, _CONTEXT_ATTR)
    mask = kwargs.get("attention_mask")
    ctx.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    ctx.backend = requested_backend()  # once per forward, not once per adapted layer


def _forget_backend(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    # a layer called on its own after this forward asks requested_backend() again (set_backend may change it)
    getattr(module, _CONTEXT_ATTR).backend = None


def attach(model: nn.Module, config: AdapterConfig, *, layer_cls: type[AdapterLayer] | None = None) -> nn.Module:
    """Wrap every linear module selected by ``config.target_modules`` (``nn.Linear`` or bitsandbytes
    ``Linear4bit``) with the config's adapter, freeze all other parameters, return the model (in place).

    ``layer_cls``: a subclass of the method's layer to wrap with instead (PEFT's route, qmoe.peft_integration)."""
    if not isinstance(config, AdapterConfig):
        raise TypeError("attach() needs a qmoe.AdapterConfig")
    if getattr(model, _CONFIG_ATTR, None) is not None:
        raise ValueError("model already has a qmoe adapter attached; load a fresh base model to attach another")
    from .inference import unwrap_direct_4bit

    unwrap_direct_4bit(model)  # (a chat model's 4-bit layers: the adapter layers make the same direct calls)
    names = target_names(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    context = AdapterContext()
    cls = layer_class(config.method)
    if layer_cls is not None:
        if not issubclass(layer_cls, cls):
            raise TypeError(f"layer_cls must subclass {cls.__name__} for method {config.method!r}")
        cls = layer_cls
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = cls(base, config, context)
        for p in layer.base_layer.parameters():
            p.requires_grad_(False)
        setattr(parent, child, layer)
    setattr(model, _CONTEXT_ATTR, context)
    setattr(model, _CONFIG_ATTR, config)
    hooks = (
        model.register_forward_pre_hook(_capture_mask, with_kwargs=True),
        model.register_forward_hook(_forget_backend, always_call=True),
    )
    setattr(model, _HOOK_ATTR, hooks)
    if config.method == "loracoe":
        set_stage(model, config.stage)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo :func:`attach`: put the base linear layers back and drop the adapter, return the model (in place).

    Parameters attach froze stay frozen."""
    model = unwrap(model)
    if getattr(model, _CONFIG_ATTR, None) is None:
        raise ValueError("no qmoe adapter attached to this model")
    for name in list(adapter_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).base_layer)
    for handle in getattr(model, _HOOK_ATTR, ()):
        handle.remove()
    for attr in (_CONTEXT_ATTR, _CONFIG_ATTR, _HOOK_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model qmoe attached to, through wrappers that hold it as ``.module`` (DDP, DataParallel, FSDP):
    Trainer hands ``compute_loss`` the wrapper, which has neither the adapter config nor the bare layer
    names."""
    while getattr(model, _CONFIG_ATTR, None) is None and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, AdapterLayer)}


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    return getattr(unwrap(model), _CONFIG_ATTR, None)


def adapter_context(model: nn.Module) -> AdapterContext:
    ctx = getattr(unwrap(model), _CONTEXT_ATTR, None)
    if ctx is None:
        raise ValueError("no qmoe adapter attached to this model (call qmoe.attach first)")
    return ctx


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that will receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cast_adapter(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Keep the adapter weights in ``dtype`` (e.g. float32 master weights over a bf16 backbone, as PEFT does);
    the layers cast their input to it and their output back to the backbone's dtype. The backbone is untouched."""
    for layer in adapter_layers(model).values():
        for name in layer.adapter_param_names:
            param = getattr(layer, name)
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


def adapter_parameters(model: nn.Module) -> int:
    """Number of adapter parameters (trainable or not, e.g. LoRACoE's router during warm-up)."""
    return sum(getattr(layer, n).numel() for layer in adapter_layers(model).values() for n in layer.adapter_param_names)


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Weighted auxiliary losses of the last training forward, averaged over adapted layers.

    MoELoRA: balance_loss_weight * balance + contrastive_loss_weight * contrastive; zero for the other
    methods. Averaging over layers keeps the weights' meaning independent of model depth.
    """
    parts = aux_loss_parts(model)
    config = adapter_config(model)
    zero = _zero_like_model(model)
    if config is None or config.method != "moelora" or not parts:
        return zero
    return config.balance_loss_weight * parts["balance"] + config.contrastive_loss_weight * parts["contrastive"]


def aux_loss_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unweighted per-name auxiliary losses of the last training forward, averaged over layers."""
    sums: dict[str, list[torch.Tensor]] = {}
    for layer in adapter_layers(model).values():
        for name, value in layer.aux_losses().items():
            sums.setdefault(name, []).append(value)
    return {name: torch.stack([v.float() for v in values]).mean() for name, values in sums.items()}


def clear_aux(model: nn.Module) -> None:
    """Drop the stored auxiliary losses (and their graphs) once they have been used."""
    for layer in adapter_layers(model).values():
        layer.aux = {}


def _zero_like_model(model: nn.Module) -> torch.Tensor:
    p = next(model.parameters())
    return torch.zeros((), device=p.device)


def set_stage(model: nn.Module, stage: str) -> None:
    """LoRACoE's training stage: 'warmup' (plain LoRA, router frozen) or 'joint' (LoRA + router)."""
    if stage not in ("warmup", "joint"):
        raise ValueError(f"stage={stage!r} is invalid: must be 'warmup' or 'joint'")
    config = adapter_config(model)
    if config is None or config.method != "loracoe":
        raise ValueError("set_stage applies to loracoe adapters only")
    for layer in adapter_layers(model).values():
        layer.set_stage(stage)
    object.__setattr__(config, "stage", stage)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without gradients for the block, back in its own mode afterwards (scoring a model
    mid-training must not leave dropout off or switch it on)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
