"""What is compared: qmoe's methods at their paper defaults, and PEFT LoRA at the same trainable-parameter
count on the same frozen Linear4bit weights."""

from __future__ import annotations

import torch

from ..config import DEFAULT_TARGETS, AdapterConfig

# the configurations the targets name: MoELoRA 8 experts x rank 4, top-2; LoRACoE E=2, r=16 (joint stage)
METHOD_SETTINGS = {
    "moelora": dict(method="moelora"),
    "loracoe": dict(method="loracoe", stage="joint"),
    "loramoe": dict(method="loramoe"),
    "lora": dict(method="lora"),
    # MoELoRA without its contrastive loss: separates the routing's cost from the loss's (a method choice)
    "moelora-nocl": dict(method="moelora", contrastive_loss_weight=0.0),
}
PEFT = "peft-lora"


def method_config(method: str, dropout: float | None = None) -> AdapterConfig:
    settings = dict(METHOD_SETTINGS[method])
    if dropout is not None:
        settings["dropout"] = dropout
    return AdapterConfig(**settings)


def matching_rank(trainable: int, width: int) -> int:
    """PEFT LoRA rank whose r * (in + out) summed over the adapted layers (``width``) is nearest ``trainable``."""
    return max(1, round(trainable / width))


def peft_layer(base: torch.nn.Module, r: int, dropout: float) -> torch.nn.Module:
    """PEFT's LoRA wrapper of one bitsandbytes Linear4bit (alpha = 2r, as qmoe's defaults)."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit

    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout)
    return Linear4bit(base, "default", config, r=r, lora_alpha=2 * r, lora_dropout=dropout)


def attach_peft(model: torch.nn.Module, r: int, dropout: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def adapted_width(model: torch.nn.Module) -> int:
    """Sum of in + out features over the linear layers the default targets select."""
    from ..attach import target_names

    config = AdapterConfig(method="lora")
    return sum(
        model.get_submodule(n).in_features + model.get_submodule(n).out_features for n in target_names(model, config)
    )


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
