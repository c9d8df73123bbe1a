"""Backbones for the benchmarks: the builtin SmolLM2-135M (real weights) and random-weight Llama models of
real shapes built from a config (1B- and 7B-class). Random weights are fine for speed and memory.

Random backbones are built in bf16 and each decoder linear is quantized to NF4 as soon as it exists, so the
peak while building stays near the 4-bit model's size plus one full-precision layer.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Real shapes of public models (from their config.json); num_hidden_layers may be cut with `layers=`
RANDOM_SHAPES = {
    # Llama-3.2-1B
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    # Llama-2-7B
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}
BUILTIN = "smollm2-135m"
GPU_ONLY = {"llama-7b"}


def compute_dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: str) -> nn.Module:
    """A bitsandbytes NF4 Linear4bit holding ``weight`` (quantized on the move to ``device``)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.detach().to("cpu", torch.bfloat16), requires_grad=False, quant_type="nf4")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", dtype), requires_grad=False)
    return layer.to(device)


def random_linear4bit(in_features: int, out_features: int, device: str, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.02
    return quantized_linear(weight, None, compute_dtype_for(device), device)


def model_config(name: str, layers: int | None = None) -> PretrainedConfig:
    """The transformers config of a backbone (SmolLM2's from its converted folder)."""
    from transformers import AutoConfig, LlamaConfig

    if name == BUILTIN:
        config = AutoConfig.from_pretrained(smollm2_dir())
    else:
        config = LlamaConfig(**RANDOM_SHAPES[name], max_position_embeddings=4096)
    if layers:
        config.num_hidden_layers = layers
    config.use_cache = False
    return config


def smollm2_dir() -> Path:
    from ..models import builtin_model_dir

    return builtin_model_dir("builtin:smollm2-135m-instruct")


def load_backbone(name: str, device: str, layers: int | None = None, seed: int = 0) -> nn.Module:
    """A frozen NF4 causal LM on ``device`` (compute dtype fp32 on CPU, bf16 on CUDA)."""
    dtype = compute_dtype_for(device)
    if name == BUILTIN:
        from ..testing import load_model

        model = load_model(smollm2_dir(), quantization="nf4", compute_dtype=dtype, device=device)
        if layers:
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
    else:
        model = _random_backbone(model_config(name, layers), dtype, device, seed)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _random_backbone(config, dtype, device, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # build on CPU in bf16 (half of fp32), quantize the decoder linears, then move the rest
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for block in model.model.layers:
        for parent in list(block.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, child_name, quantized_linear(child.weight, child.bias, dtype, device))
    model.model.embed_tokens.to(device=device, dtype=dtype)
    model.model.norm.to(device=device, dtype=dtype)
    model.model.rotary_emb.to(device=device)
    for block in model.model.layers:
        for module in block.modules():
            if not isinstance(module, nn.Linear):
                for p in module.parameters(recurse=False):
                    p.data = p.data.to(device=device, dtype=dtype)
    if not config.tie_word_embeddings:
        model.lm_head.to(device=device, dtype=dtype)
    else:
        model.tie_weights()
    return model


def share_frozen_clone(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose frozen parameters and buffers are the same tensors (no copy), so
    several adapters can be timed side by side on one backbone in one process."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)
