"""``qmoe bench --generate``: generation tokens/s of the base model vs the same model with each method's
adapter, batch 1 (chat) and batch 16 (evaluation), prefill and decode timed separately.

Every adapted model is a structural copy of the one loaded base sharing its frozen weights, set up the way
``qmoe chat`` / ``qmoe eval`` run it (eval mode, the inference fast path, on CPU the dequantised copy of the
4-bit weights when it fits), and all candidates are timed interleaved in this process, rotating the order each
round, so ratios to the base compare like with like. Wall and CPU time (this process, all threads) are both
kept: on a shared CPU the CPU time barely moves when other processes compete for the cores.

``base`` is the model as transformers and bitsandbytes run it. Where bitsandbytes multiplies with its built-in
bf16 CPU kernel, qmoe's adapter layers call that kernel directly (``qmoe.kernels.bnb_cpu``), and so does chat's
base model (``base-direct``: every 4-bit layer in :class:`qmoe.inference.Direct4bit`); the last column compares
with it, i.e. what the adapter itself costs, and ``<method>-bnb-forward`` rows run each adapter over bitsandbytes'
forward instead (what the direct call saves).

A fresh adapter's B is zero: it generates exactly the base's tokens while paying for its routing. Extra rows:
``wrapper-floor`` (each adapted projection wrapped in a module that only calls the frozen layer's forward: what an
unmerged adapter over bitsandbytes' forward pays before doing any arithmetic), ``peft-lora`` (PEFT's
LoRA at qmoe LoRA's rank on the same frozen weights, unmerged: the baseline users know), ``lora-merged``
(the LoRA folded into dense weights, ``qmoe chat --merge``), the base on the other choice of frozen weights
(``base-4bit`` or ``base-dequantised``, see ``--dequantize``), ``moelora-eager`` (the fast path with qmoe's
CPU kernels off, ``QMOE_KERNELS=torch``: what the kernels save) and ``moelora-4bit-reference`` (4-bit
weights and the training code path: what chat ran before the inference fast path existed). With ``compiled``
(``--compile``): ``base-compiled`` and ``<method>-compiled``, the same models with their decode step compiled
(``qmoe chat --compile``, qmoe.inference.compile_decode) and a static KV cache, compiled for each batch size before
its timed rounds: batch 1 is chat's case, the larger batches say whether evaluation would gain from compiling
(``qmoe eval`` does not compile: on CPU it measured no gain at batch 16, BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable

import torch

BASE = "base"
QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def _decode_loop(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, device: str) -> tuple[float, ...]:
    """(prefill wall, prefill cpu, decode wall, decode cpu) seconds of one greedy generation with a KV cache."""
    from .timing import synchronize

    mask = torch.ones_like(ids)
    with torch.no_grad():
        synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        w1, c1 = time.perf_counter(), time.process_time()
        cache = out.cache  # (transformers 5.x: `cache`, formerly past_key_values)
        for _ in range(new_tokens):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        w2, c2 = time.perf_counter(), time.process_time()
    return w1 - w0, c1 - c0, w2 - w1, c2 - c1


def _decode_loop_static(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, device: str) -> tuple[float, ...]:
    """:func:`_decode_loop` with a static KV cache of exactly prompt + new tokens, as a compiled decode step needs
    (``qmoe.inference.compile_decode``: ``model``'s one-token forwards run compiled). No attention mask: the rows are
    the same unpadded prompt, and a mask growing by one column per step would change the compiled graph's input."""
    from transformers import StaticCache

    from .timing import synchronize

    length = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + new_tokens + 1)
    with torch.no_grad():
        synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        positions = torch.arange(length, device=ids.device)
        out = model(input_ids=ids, cache=cache, use_cache=True, cache_position=positions)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        w1, c1 = time.perf_counter(), time.process_time()
        for i in range(new_tokens):
            position = torch.tensor([length + i], device=ids.device)
            out = model(input_ids=token, cache=cache, use_cache=True, cache_position=position)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        w2, c2 = time.perf_counter(), time.process_time()
    return w1 - w0, c1 - c0, w2 - w1, c2 - c1


# the row keys of decode time against base-direct (the base with the adapters' direct 4-bit calls)
DIRECT = "decode_s_vs_base_direct"
TIMES = ("prefill_s", "prefill_cpu_s", "decode_s", "decode_cpu_s")  # what _decode_loop returns, in order


def _interleaved(
    candidates: dict[str, Callable[[], tuple[float, ...]]], repeats: int, warmup: int
) -> dict[str, list[tuple[float, ...]]]:
    """Every candidate's times per round (``TIMES``), the order rotated each round; warm-up rounds dropped."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(candidates[name]())
    return runs


def paired_ratios(runs: dict[str, list[tuple[float, ...]]], reference: str = BASE) -> dict[str, dict]:
    """Per candidate: the median of each time (``TIMES``) and, for each, ``<time>_ratio`` = the median over rounds
    of reference time / candidate time within the same round (higher is faster), with ``<time>_ratio_range``
    [lowest, highest] over the rounds. Pairing within a round keeps slow drifts of the machine out of the ratio;
    the range says how far one run can be trusted."""
    out = {}
    for name, rounds in runs.items():
        row: dict = {k: statistics.median(r[j] for r in rounds) for j, k in enumerate(TIMES)}
        for j, k in enumerate(TIMES):
            ratios = [_ratio(ref[j], own[j]) for ref, own in zip(runs[reference], rounds, strict=True)]
            row[f"{k}_ratio"] = statistics.median(ratios)
            row[f"{k}_ratio_range"] = [min(ratios), max(ratios)]
        out[name] = row
    return out


def _ratio(reference: float, own: float) -> float:
    if own > 0:
        return reference / own
    return 1.0 if reference == 0 else math.inf  # (a CPU clock too coarse for a tiny run)


def ratio_cell(row: dict, key: str) -> str:
    """'0.86 (0.83-0.88)': the median paired ratio and its range over rounds (the range only with 2+ rounds)."""
    low, high = row[f"{key}_ratio_range"]
    median = row[f"{key}_ratio"]
    return f"{median:.2f}" if low == high else f"{median:.2f} ({low:.2f}–{high:.2f})"


def _with_setting(run: Callable[[], tuple[float, ...]], read: Callable, write: Callable, value) -> Callable:
    """``run`` with a process-wide switch (``read``/``write``) set to ``value`` meanwhile, restored after."""

    def wrapped():
        before = read()
        write(value)
        try:
            return run()
        finally:
            write(before)

    return wrapped


def _switched(kind: str, run: Callable[[], tuple[float, ...]]) -> Callable[[], tuple[float, ...]]:
    """``run`` under one of the rows' switches: ``reference`` the training code path, ``eager`` the kernel backend
    forced to plain PyTorch (qmoe's CPU and Triton kernels off), ``bnb-forward`` adapter layers built meanwhile
    calling bitsandbytes' forward instead of its kernel directly."""
    from .. import kernels
    from ..kernels import bnb_cpu
    from ..tuners.base import fast_inference_enabled, set_fast_inference

    switches = {
        "reference": (fast_inference_enabled, set_fast_inference, False),
        "eager": (kernels.forced_backend, kernels.set_backend, "torch"),
        "bnb-forward": (bnb_cpu.direct_calls_enabled, bnb_cpu.set_direct_calls, False),
    }
    return _with_setting(run, *switches[kind])


class _PassThrough(torch.nn.Module):
    """Wraps a frozen layer and only calls it (the ``wrapper-floor`` row)."""

    def __init__(self, base_layer: torch.nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)


def _wrapped_only(base: torch.nn.Module) -> torch.nn.Module:
    """A clone of ``base`` whose default adapter targets are wrapped in :class:`_PassThrough`."""
    from ..attach import target_names
    from ..config import AdapterConfig
    from .backbones import share_frozen_clone

    model = share_frozen_clone(base)
    for name in target_names(model, AdapterConfig(method="lora")):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, _PassThrough(getattr(owner, child)))
    return model


def _merged_lora(base: torch.nn.Module) -> torch.nn.Module:
    """A LoRA attached to a clone of ``base`` and merged into fresh copies of the layers it adapts."""
    from ..attach import adapter_layers, attach
    from ..inference import merge_lora
    from .adapters import method_config
    from .backbones import share_frozen_clone

    model = attach(share_frozen_clone(base), method_config("lora", dropout=0.0))
    for layer in adapter_layers(model).values():
        if isinstance(layer.base_layer, torch.nn.Linear) and type(layer.base_layer) is torch.nn.Linear:
            layer.base_layer = copy.deepcopy(layer.base_layer)  # merging adds into it: not the shared weights
    return merge_lora(model)


def measure_generation(
    source: str = "builtin:smollm2-135m-instruct",
    device: str = "auto",
    methods: list[str] | None = None,
    batch_sizes: tuple[int, ...] = (1, 16),
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    dequantize: str = "auto",
    progress: Callable[[str], None] | None = None,
    compiled: bool = False,
) -> dict:
    from .. import attach, kernels
    from ..inference import call_4bit_directly, compile_decode, dequantize_frozen
    from ..kernels import cpu_decode
    from ..models import load_base_model
    from . import machine_info
    from .adapters import attach_peft, method_config, trainable
    from .backbones import share_frozen_clone

    methods = methods or ["moelora", "loracoe", "loramoe", "lora"]
    say = progress or (lambda _msg: None)
    base, tokenizer, device = load_base_model(source, "nf4", "auto", device)
    base.eval()
    base.config.use_cache = True
    four_bit = share_frozen_clone(base)  # before dequantising: keeps the 4-bit layers (shared)
    dequantized = dequantize_frozen(base, dequantize, device)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    models: dict[str, torch.nn.Module] = {BASE: base, "wrapper-floor": _wrapped_only(base).eval()}
    params = {BASE: 0, "wrapper-floor": 0}
    for method in methods:
        models[method] = attach(share_frozen_clone(base), method_config(method, dropout=0.0)).eval()
        params[method] = trainable(models[method])
    if "lora" in methods:
        models["lora-merged"], params["lora-merged"] = _merged_lora(base).eval(), 0
        rank = method_config("lora").r
        models["peft-lora"] = attach_peft(share_frozen_clone(base), rank, 0.0).eval()
        params["peft-lora"] = trainable(models["peft-lora"])
    # the other choice of frozen weights, and what chat ran before this fast path (4-bit, training code path)
    if dequantized:
        models["base-4bit"], params["base-4bit"] = four_bit, 0
    elif dequantize_frozen(other := share_frozen_clone(four_bit), "on", device):
        models["base-dequantised"], params["base-dequantised"] = other, 0
    if not dequantized and call_4bit_directly(direct := share_frozen_clone(base), device):
        models["base-direct"], params["base-direct"] = direct.eval(), 0
    switched: dict[str, str] = {}  # model name -> the switch its runs are under (_switched)
    if "base-direct" in models:
        # each method again over bitsandbytes' forward (what its adapter layers ran before they called the kernel)
        for method in methods:
            name = f"{method}-bnb-forward"
            models[name] = attach(share_frozen_clone(base), method_config(method, dropout=0.0)).eval()
            params[name] = params[method]
            switched[name] = "bnb-forward"
    if "moelora" in methods:
        # its own adapter (its own fused-weight cache), timed with the kernel backend forced to plain PyTorch
        models["moelora-eager"] = attach(share_frozen_clone(base), method_config("moelora", dropout=0.0)).eval()
        params["moelora-eager"] = params["moelora"]
        switched["moelora-eager"] = "eager"
        name = "moelora-4bit-reference"
        models[name] = attach(share_frozen_clone(four_bit), method_config("moelora", dropout=0.0)).eval()
        params[name] = params["moelora"]
        switched[name] = "reference"
    static = set()
    if compiled:
        # the base and each method again, with their decode step compiled (qmoe chat --compile)
        for name in [BASE, *methods]:
            clone = share_frozen_clone(base)
            model = (clone if name == BASE else attach(clone, method_config(name, dropout=0.0))).eval()
            if not dequantized:
                call_4bit_directly(model, device)  # as qmoe chat does before compiling
            # static shapes: one fixed-size cache per row (torch would otherwise share shape guesses across the
            # models' copies of one forward and compile them shape-generic, slower to build and to run)
            compile_decode(model, device, dynamic=False)
            models[f"{name}-compiled"], params[f"{name}-compiled"] = model, params[name]
            static.add(f"{name}-compiled")
    rows = []
    for batch in batch_sizes:
        ids = prompt.expand(batch, -1).contiguous()
        candidates = {}
        for name, model in models.items():
            loop = _decode_loop_static if name in static else _decode_loop
            run = lambda m=model, i=ids, f=loop: f(m, i, new_tokens, device)  # noqa: E731
            candidates[name] = _switched(switched[name], run) if name in switched else run
        if static:  # (each batch size is a new graph: dynamic=False)
            say(f"compiling the decode step of {len(static)} models for batch {batch}")
            for name in static:
                candidates[name]()
        say(f"generation, batch {batch}: {len(candidates)} models x {repeats} rounds of {new_tokens} new tokens")
        runs = _interleaved(candidates, repeats, warmup)
        summary = paired_ratios(runs)
        # against the base with the same direct calls as the adapters': what the adapter itself costs
        direct_ratios = paired_ratios(runs, reference="base-direct") if "base-direct" in runs else {}
        for name, m in summary.items():
            against_direct = direct_ratios.get(name, {})
            rows.append(
                dict(
                    model=name,
                    batch=batch,
                    trainable_params=params[name],
                    prefill_tokens_per_s=batch * ids.shape[1] / m["prefill_s"],
                    decode_tokens_per_s=batch * new_tokens / m["decode_s"],
                    decode_ratio_to_base=m["decode_s_ratio"],
                    decode_cpu_ratio_to_base=m["decode_cpu_s_ratio"],
                    prefill_ratio_to_base=m["prefill_s_ratio"],
                    decode_ratio_to_base_direct=against_direct.get("decode_s_ratio"),
                    # (ratio_cell(row, DIRECT) reads these two)
                    **{f"{DIRECT}_ratio": against_direct.get("decode_s_ratio")},
                    **{f"{DIRECT}_ratio_range": against_direct.get("decode_s_ratio_range")},
                    **m,
                )
            )
    meta = dict(
        machine_info(device),
        source=source,
        dtype=str(next(p for p in base.parameters() if p.is_floating_point()).dtype).replace("torch.", ""),
        frozen_weights="dequantised copy of NF4" if dequantized else "NF4",
        prompt_tokens=int(prompt.shape[1]),
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
        threads=torch.get_num_threads(),
        kernel_backends=kernels.backends_used(),
        cpu_kernels=cpu_decode.status(),
    )
    return {"meta": meta, "rows": rows}


def markdown_generation(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"Generation, {meta['source']} ({meta['frozen_weights']}, {meta['dtype']} compute) on "
        f"{meta['device_name']}, {meta['threads']} thread(s): greedy with a KV cache, {meta['prompt_tokens']}-token "
        f"prompt, {meta['new_tokens']} new tokens, median of {meta['repeats']} interleaved rounds; qmoe's CPU "
        f"kernels: {meta.get('cpu_kernels', '-')}. Ratios: base time / model time within each round, the median "
        "over rounds and (in brackets) the lowest and highest round (1.00 = base speed; higher is faster).",
        "",
        "| model | batch | prefill tok/s | decode tok/s | decode × base (wall) | decode × base (CPU) "
        "| prefill × base | decode × base-direct (wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        direct = ratio_cell(r, DIRECT) if r.get(f"{DIRECT}_ratio") is not None else "–"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} "
            f"| {ratio_cell(r, 'decode_s')} | {ratio_cell(r, 'decode_cpu_s')} | {ratio_cell(r, 'prefill_s')} "
            f"| {direct} |"
        )
    return "\n".join(lines) + "\n"
