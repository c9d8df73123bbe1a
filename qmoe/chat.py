"""Chatting with a tuned model, shared by ``qmoe chat`` and the UI's Chat tab.

``load_chat_model(path=None, base_source=None, quantization="nf4", compute_dtype="auto", device="auto",
revision=None, dequantize="auto", merge=False, compile=False)``
    -> :class:`ChatModel`. ``path`` is a run directory (its recipe names the base model and its ``adapter/``
    is loaded), an adapter folder (base model from ``base_source`` or the folder's
    ``base_model_name_or_path``), a hub repo id of an adapter (``owner/name``, downloaded into the hub cache;
    ``revision`` picks a branch, tag or commit), or None for the base model alone (``base_source``, default the builtin
    SmolLM2). Raises ``qmoe.errors.UsageError`` with one line when something cannot be loaded.

``stream_reply(chat_model, messages, max_new_tokens=256, temperature=0.0, trace=False)``
    -> iterator of events. ``{"text": piece}`` while generating (a TextIteratorStreamer feeds it), then one
    final ``{"done": True, "text": reply, "tokens": [str, ...], "routing": {layer: Tensor[n_tokens, experts]}}``.
    With ``trace=True`` ``routing`` holds, for every routed layer, the dense routing weights of each generated
    token: row i is the routing of the forward pass that produced token i (for LoRACoE the columns are the
    r ranks). ``messages`` is a chat list: ``[{"role": "user", "content": "..."}, ...]``.

``top_experts(weights, top=2)`` -> per token a list of ``(expert, weight)`` pairs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UsageError
from .routing import top_experts as top_experts  # part of this module's API (see the docstring); one definition

log = logging.getLogger("qmoe")

DEFAULT_SOURCE = "builtin:smollm2-135m-instruct"


@dataclass
class ChatModel:
    model: object
    tokenizer: object
    source: str
    adapter_dir: Path | None = None
    routed_layers: list[str] = field(default_factory=list)
    dequantized: bool = False  # the frozen 4-bit weights are held dequantised (qmoe.inference.dequantize_frozen)
    merged: bool = False  # the LoRA adapter is folded into the weights
    compiled: bool = False  # generate compiles its decode step (qmoe.inference.compile_decode)


def resolve_adapter(
    path: str | Path | None, base_source: str | None = None, revision: str | None = None
) -> tuple[str, str, str, Path | None]:
    """(base source, quantization, compute dtype, adapter dir or None) for a run dir, adapter dir, hub repo id
    of an adapter (downloaded into the hub cache, at ``revision``) or None."""
    from .hub import download_adapter, is_repo_id
    from .recipe import load_recipe
    from .rundir import ADAPTER, RECIPE
    from .serialization import AdapterError, read_adapter_config

    if path is None:
        return base_source or DEFAULT_SOURCE, "nf4", "auto", None
    if is_repo_id(path):
        try:
            path = download_adapter(str(path), revision)
        except AdapterError as exc:
            raise UsageError(str(exc)) from None
    elif revision is not None:
        raise UsageError(f"--revision applies to hub repo ids, not to the local folder {path}")
    path = Path(path)
    if not path.exists():
        raise UsageError(f"not found: {path}")
    if (path / RECIPE).is_file():
        recipe = load_recipe(path)
        adapter = path / ADAPTER
        if not adapter.is_dir():
            raise UsageError(f"{path} has no {ADAPTER}/ yet (training not finished?)")
        return base_source or recipe.model.source, recipe.model.quantization, recipe.model.compute_dtype, adapter
    try:
        _, _, raw = read_adapter_config(path)
    except AdapterError as exc:
        raise UsageError(str(exc)) from None
    source = base_source or _recorded_base(raw.get("base_model_name_or_path"))
    if not source:
        raise UsageError(f"{path} does not name its base model; pass the base model explicitly (--base)")
    return source, "nf4", "auto", path


def _recorded_base(name: str | None) -> str | None:
    """The base model an adapter folder names, as a source this machine can load: the folder a builtin model
    was converted into (a path on the machine that trained) means that builtin model."""
    from .models import BUILTIN_GGUF

    if name and not Path(name).exists():
        for source, (_, _, folder) in BUILTIN_GGUF.items():
            if Path(name).name == folder:
                return source
    return name


def load_chat_model(
    path: str | Path | None = None,
    base_source: str | None = None,
    quantization: str | None = None,
    compute_dtype: str | None = None,
    device: str = "auto",
    revision: str | None = None,
    dequantize: str = "auto",
    merge: bool = False,
    compile: bool = False,
) -> ChatModel:
    """(see the module docstring) ``dequantize`` auto | on | off: keep a dequantised copy of the frozen 4-bit
    weights (auto: on CPU when it fits and pays, see qmoe.inference); ``merge``: fold a LoRA adapter into the
    weights (a mixture raises UsageError); ``compile``: generate with a compiled decode step (the first reply
    waits for the compilation; replies with routing traces run uncompiled)."""
    from .attach import adapter_layers
    from .inference import (
        call_4bit_directly,
        compile_decode,
        dequantize_frozen,
        merge_lora,
        note_merge_on_4bit_cpu,
    )
    from .models import load_base_model
    from .serialization import AdapterError, load_adapter

    source, quant, dtype, adapter_dir = resolve_adapter(path, base_source, revision)
    if merge and adapter_dir is None:
        raise UsageError("--merge needs an adapter (a run directory or adapter folder) to merge")
    model, tokenizer, device = load_base_model(source, quantization or quant, compute_dtype or dtype, device)
    if adapter_dir is not None:
        try:
            load_adapter(model, adapter_dir)
        except AdapterError as exc:
            raise UsageError(str(exc)) from None
    if merge:
        model = merge_lora(model)
    dequantized = dequantize_frozen(model, dequantize, device)
    if merge and not dequantized:
        note_merge_on_4bit_cpu(model, device)
    if not dequantized:
        call_4bit_directly(model, device)  # (adapter layers make the same calls themselves)
    model.eval()
    model.config.use_cache = True
    if compile:
        compile_decode(model, device)
        log.info(
            "--compile: the first reply compiles the decode step first (about a minute on a CPU, less once torch "
            "has cached it); replies that show routing run uncompiled"
        )
    routed = (
        [name for name, layer in adapter_layers(model).items() if layer.routed] if adapter_dir and not merge else []
    )
    return ChatModel(model, tokenizer, source, adapter_dir, routed, dequantized, merge, compile)


# Intra-op threads of the generating thread on CPU. It is not the main thread (the streamer's consumer is), and
# measured there (BENCHMARKS.md, "Chat"), two threads decoded the builtin model 1.6x slower than one with
# bitsandbytes' 4-bit kernel, and no faster with dense weights. QMOE_CHAT_THREADS overrides it.
CHAT_THREADS_ENV = "QMOE_CHAT_THREADS"


def generation_threads() -> int:
    """Torch CPU threads :func:`stream_reply` generates with (``$QMOE_CHAT_THREADS``, default 1)."""
    value = os.environ.get(CHAT_THREADS_ENV, "1").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"{CHAT_THREADS_ENV}={value!r} is invalid: must be a whole number >= 1")
    return int(value)


def stream_reply(
    chat: ChatModel, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, trace: bool = False
) -> Iterator[dict]:
    from transformers import TextIteratorStreamer

    from .routing import routing, set_tracing

    tokenizer, model = chat.tokenizer, chat.model
    threads = generation_threads()  # (checked before any work: a bad value is a UsageError here)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = (
        dict(do_sample=True, temperature=temperature)
        if temperature > 0
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    )
    result: dict = {}
    tracing = trace and bool(chat.routed_layers)
    if chat.compiled:
        from .inference import prepare_compiled_decode

        prepare_compiled_decode(model)  # (an adapter changed since the last reply: its fused weights again)

    def work():
        before = torch.get_num_threads()
        if model.device.type == "cpu":
            torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                result["ids"] = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    streamer=streamer,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
        except BaseException as exc:  # surfaced in the caller's thread below
            result["error"] = exc
            streamer.end()
        finally:
            torch.set_num_threads(before)

    if tracing:
        set_tracing(model, True)
        if chat.compiled:
            model.forward.eager = True  # compiled layers record no routing: this reply runs uncompiled
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    pieces = []
    try:
        for piece in streamer:
            pieces.append(piece)
            yield {"text": piece}
        thread.join()
    finally:
        if tracing:
            from .attach import adapter_context

            adapter_context(model).trace = False
            if chat.compiled:
                model.forward.eager = False
    if "error" in result:
        raise result["error"]
    new_ids = result["ids"][0, inputs["input_ids"].shape[1] :]
    tokens = [tokenizer.decode([int(t)]) for t in new_ids]
    per_layer = {}
    if tracing:
        for name, info in routing(model).items():
            # one trace record per forward; its last row is the position that produced the next token
            rows = [w[-1] for w in info["trace"] if w.shape[0] > 0]
            if rows:
                per_layer[name] = torch.stack(rows)[: len(tokens)].float().cpu()
    yield {"done": True, "text": "".join(pieces), "tokens": tokens, "routing": per_layer}
