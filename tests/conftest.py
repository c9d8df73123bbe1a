import os
from pathlib import Path

import pytest

from qmoe.testing import load_model, save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QMOE_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random-weight 2-layer Llama saved as safetensors (shared by the session; never modified)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_4bit(tiny_dir):
    """Factory: a fresh NF4-quantized tiny Llama on CPU, fp32 compute."""

    def make(quantization="nf4", **kwargs):
        return load_model(tiny_dir, quantization=quantization, **kwargs)

    return make


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """A tiny random Llama with a real trained tokenizer and chat template (read-only; shared)."""
    from pipeline_support import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """GSM8K-format train.jsonl (32 items) and test.jsonl (8 items) of arithmetic problems (read-only)."""
    from pipeline_support import arithmetic_items, write_jsonl

    folder = tmp_path_factory.mktemp("arith")
    write_jsonl(folder / "train.jsonl", arithmetic_items(32))
    write_jsonl(folder / "test.jsonl", arithmetic_items(8, start=100))
    return folder


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED
