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
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED
