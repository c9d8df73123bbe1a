"""The model a recipe trains, built from its config alone on the meta device, and the bytes its weights,
adapter and optimizer take, from shapes (no weight is read or allocated).

Frozen weights are counted as bitsandbytes stores them once transformers has quantized them: which linear
layers are converted is transformers' own rule (``get_keys_to_not_convert`` and ``should_convert_module``,
the functions its bitsandbytes quantizer calls); every other parameter (embeddings, norms, an untied LM head)
stays in the compute dtype.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from ..config import AdapterConfig

# bitsandbytes' blocksizes as transformers quantizes (it passes none): Params4bit's default of 64 weights per
# absmax, and quantize_4bit(compress_statistics=True)'s 256 absmax values per second-level block (double
# quantization, which qmoe turns on for nf4: qmoe.models.load_base_model)
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
CODE_4BIT_ENTRIES = 16  # get_4bit_type: the 16 fp32 values of the nf4/fp4 code, one tensor per layer
CODE_8BIT_ENTRIES = 256  # quantize_blockwise's dynamic map (fp32) of the double-quantized absmax

ADAM_STATES = 2  # AdamW: exp_avg and exp_avg_sq per parameter
# bitsandbytes' 8-bit AdamW (bitsandbytes.optim.optimizer.Optimizer2State.init_state): uint8 states with an fp32
# absmax per 256 values, for parameters of at least 4096 values; smaller ones, and the 32-bit variants, keep
# fp32 states (whatever the parameter's dtype)
BNB_8BIT_BLOCKSIZE = 256
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIMIZERS = ("adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def load_model_config(source: str) -> PretrainedConfig:
    """The transformers config of a recipe's ``model.source`` (builtin, local folder or hub id), never its
    weights."""
    from transformers import AutoConfig

    from ..models import resolve_source

    where = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the config of model {source}: {str(exc).splitlines()[0]}") from None
    if getattr(config, "num_hidden_layers", None) is None:
        raise UsageError(f"model {source}: config.json has no num_hidden_layers (not a decoder-only causal LM)")
    return config


def meta_model(
    config: PretrainedConfig, dtype: torch.dtype, layers: int | None = None, attn_implementation: str = "auto"
) -> PreTrainedModel:
    """The causal LM of ``config`` on the meta device (shapes and dtypes only), optionally cut to its first
    ``layers`` decoder layers, with ``model.attn_implementation`` (flash_attention_2, which needs its package
    and a GPU to be built, is planned as sdpa's fused kernel: both keep q, k, v, output and log-sum-exp)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.use_cache = False
    if layers is not None and layers < config.num_hidden_layers:
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    kwargs = {}
    if attn_implementation not in ("auto", "flash_attention_2"):
        kwargs["attn_implementation"] = attn_implementation
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    except ValueError as exc:
        raise UsageError(
            f"config of model type {config.model_type!r} is not a causal LM transformers builds: {exc}"
        ) from None
    return model


def homogeneous(config: PretrainedConfig) -> bool:
    """Every decoder layer has the same shapes and attention kind, so a few measured layers stand for all."""
    kinds = getattr(config, "layer_types", None)
    return not isinstance(kinds, list) or len(set(kinds)) <= 1


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (the unit gradient checkpointing wraps)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, nn.ModuleList) and module and isinstance(module[0], GradientCheckpointingLayer):
            return module
    raise UsageError(f"{type(model).__name__}: no decoder layers found (not a decoder-only transformers LM)")


def quantized_names(model: nn.Module) -> set[str]:
    """Names of the linear layers transformers' bitsandbytes quantizer converts to 4-bit."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, skip)
    }


@dataclass
class WeightBytes:
    packed: int = 0  # 4-bit values, two per byte
    quant_state: int = 0  # absmax per block, double-quant constants, code tables
    unquantized: int = 0  # everything kept in the compute dtype: embeddings, LM head, norms, biases, buffers


def four_bit_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """(packed bytes, quantization-state bytes) of one 4-bit weight of ``numel`` values (bitsandbytes)."""
    blocks = math.ceil(numel / BLOCKSIZE)
    state = CODE_4BIT_ENTRIES * 4
    if double_quant:  # uint8 absmax per block, fp32 absmax per 256 blocks, the 8-bit map, the fp32 offset
        state += blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * CODE_8BIT_ENTRIES + 4
    else:
        state += 4 * blocks  # fp32 absmax per block
    return math.ceil(numel / 2), state


def weight_bytes(model: nn.Module, quantization: str) -> WeightBytes:
    """The frozen backbone's bytes as loaded by ``qmoe.models.load_base_model`` (``model`` before attach)."""
    out = WeightBytes()
    quantized = quantized_names(model) if quantization != "none" else set()
    quantized_weights = {id(model.get_submodule(n).weight) for n in quantized}
    for name in quantized:
        packed, state = four_bit_bytes(model.get_submodule(name).weight.numel(), double_quant=quantization == "nf4")
        out.packed += packed
        out.quant_state += state
    for tensor in [*model.parameters(), *model.buffers()]:  # parameters() yields a tied weight once
        if id(tensor) not in quantized_weights:
            out.unquantized += tensor.numel() * tensor.element_size()
    return out


def attach_meta(model: nn.Module, adapter: AdapterConfig, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """``qmoe.attach`` on a meta model. The adapters wrap the plain ``nn.Linear`` layers of the meta model:
    they stand in for bitsandbytes ``Linear4bit`` (which does not run on meta) — its ``MatMul4Bit`` keeps
    only the packed weight for backward (on ``ctx``, not through ``save_for_backward``), a frozen parameter
    already counted, and a frozen ``nn.Linear`` likewise keeps only its weight, so what autograd saves is
    the same."""
    from ..attach import attach, cast_adapter
    from ..config import AdapterConfig

    try:
        model = attach(model, AdapterConfig(**adapter.to_dict()))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if adapter_dtype is not None:  # train.adapter_dtype, as qmoe.pipeline casts the adapter
        cast_adapter(model, adapter_dtype)
    return model


@dataclass
class AdapterBytes:
    parameters: int = 0  # every adapter parameter (LoRACoE's frozen warm-up router too)
    trainable: int = 0  # those that get gradients
    optimizer: int = 0  # the optimizer's state of the trainable ones


def optimizer_state_bytes(p: torch.Tensor, optim: str) -> int:
    """Bytes of ``optim``'s state for one parameter (``train.optim``: transformers' optimizer names)."""
    n = p.numel()
    if optim not in BNB_OPTIMIZERS:  # PyTorch AdamW: states shaped and typed as the parameter
        return ADAM_STATES * n * p.element_size()
    if optim == "paged_adamw_32bit" or n < BNB_MIN_8BIT_SIZE:
        return ADAM_STATES * n * 4
    return ADAM_STATES * (n + 4 * math.ceil(n / BNB_8BIT_BLOCKSIZE))


def adapter_bytes(model: nn.Module, optim: str = "adamw_torch") -> AdapterBytes:
    from ..attach import adapter_layers

    out = AdapterBytes()
    for layer in adapter_layers(model).values():
        for name in layer.adapter_param_names:
            p = getattr(layer, name)
            size = p.numel() * p.element_size()
            out.parameters += size
            if p.requires_grad:
                out.trainable += size
                out.optimizer += optimizer_state_bytes(p, optim)
    return out


def largest_quantized_weight(model: nn.Module) -> int:
    """Values of the largest 4-bit weight: bitsandbytes dequantizes one at a time to multiply."""
    sizes = [model.get_submodule(n).weight.numel() for n in quantized_names(model)]
    return max(sizes, default=0)
