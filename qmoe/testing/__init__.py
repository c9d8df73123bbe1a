"""Tiny real models for tests and benchmarks: random-weight Llama built from a LlamaConfig, saved to a folder
and loaded back through transformers with real bitsandbytes NF4 layers (no mocks)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM


def tiny_llama_config(vocab_size: int = 256, hidden: int = 64, layers: int = 2, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def save_tiny_llama(directory: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Write a random-weight tiny Llama (safetensors) into ``directory``."""
    directory = Path(directory)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kwargs))
    model.save_pretrained(directory)
    return directory


def load_model(
    directory: str | Path,
    quantization: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """Load a causal LM folder in 4-bit (``nf4``/``fp4``) with bitsandbytes, or unquantized (``none``)."""
    if quantization == "none":
        return AutoModelForCausalLM.from_pretrained(directory, dtype=compute_dtype, device_map=device)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=bnb, dtype=compute_dtype, device_map=device
    )
