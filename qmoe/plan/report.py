"""A recipe's memory plan: each part of peak training memory, the verdict per GPU size, and the largest
batch and sequence length that fit; as a table or JSON.

Peak = frozen weights + adapter parameters + their gradients + optimizer state + contrastive queues +
activations kept for backward (measured, :mod:`qmoe.plan.activations`) + the largest transient on top of
them + (device=cuda) the CUDA context and allocator allowance.
"""

from __future__ import annotations

import copy
import json
import math
import threading
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from .activations import ActivationMeter
from .shapes import (
    adapter_bytes,
    attach_meta,
    largest_quantized_weight,
    load_model_config,
    meta_model,
    weight_bytes,
)

if TYPE_CHECKING:
    from ..recipe import Recipe

GIB = 2**30
MIB = 2**20
DEFAULT_VRAM = (8.0, 12.0, 16.0, 24.0)
# The CUDA context (driver, kernels of torch, cuBLAS and bitsandbytes loaded lazily) takes 300-600 MiB of
# device memory that no tensor accounts for; nvidia-smi shows it, torch.cuda.max_memory_allocated does not.
CUDA_CONTEXT_BYTES = 512 * MIB
# The caching allocator rounds blocks up and fragments: reserved memory runs 5-15 % above the tensors' peak
# in QLoRA-style runs (many same-shaped activations reused step after step); 10 % of the tensor peak.
ALLOCATOR_OVERHEAD = 0.10
FP32 = 4
LENGTH_LADDER = tuple(2**k for k in range(7, 18))  # 128 .. 131072 tokens, capped by the model's positions


@dataclass
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Verdict:
    vram_gib: float
    fits: bool
    headroom_bytes: int
    # the largest batch at the recipe's max_length (at most the effective batch), and the gradient
    # accumulation that keeps the recipe's effective batch with it; None: not even batch 1 fits
    batch_size: int | None = None
    gradient_accumulation: int | None = None
    # the longest max_length (power of two, or the recipe's) that fits with batch_size 1; None: none does
    max_length: int | None = None


@dataclass
class Plan:
    model: str
    method: str
    device: str
    dtype: str
    quantization: str
    gradient_checkpointing: bool
    batch_size: int
    max_length: int
    gradient_accumulation: int
    parts: list[Part]
    peak_bytes: int
    transient: str
    verdicts: list[Verdict] = field(default_factory=list)

    def fits(self, vram_gib: float) -> bool:
        return self.peak_bytes <= vram_gib * GIB

    def to_dict(self) -> dict:
        return asdict(self)


def planned_device(device: str) -> str:
    """The recipe's device as the run will pick it (``auto``: cuda when this machine has one)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def planned_dtype(compute_dtype: str, device: str) -> torch.dtype:
    """``qmoe.models.pick_dtype`` without asking a GPU: ``auto`` on cuda plans bfloat16 (every GPU of the
    8-24 GB class since Ampere has it; ``qmoe.models.pick_dtype`` falls back to float32 on older ones)."""
    if compute_dtype == "auto":
        if device == "cuda":
            if torch.cuda.is_available():
                from ..models import pick_dtype

                return pick_dtype(compute_dtype, device)
            return torch.bfloat16
        return torch.float32
    return getattr(torch, compute_dtype)


def _adapter_for_plan(recipe: Recipe):
    """The adapter at its largest stage: LoRACoE's joint stage trains the router too."""
    from ..config import AdapterConfig

    stages = {s.stage for s in recipe.train.stages or ()} | {recipe.adapter.stage}
    if recipe.adapter.method == "loracoe" and "joint" in stages:
        return AdapterConfig(**{**recipe.adapter.to_dict(), "stage": "joint"})
    return recipe.adapter


class Planner:
    """Plans one recipe at any batch and length: the model is built (on meta) once."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.device = planned_device(recipe.model.device)
        self.dtype = planned_dtype(recipe.model.compute_dtype, self.device)
        self.config = load_model_config(recipe.model.source)
        self.adapter = _adapter_for_plan(recipe)
        attn = recipe.model.attn_implementation
        adapter_dtype = None if recipe.train.adapter_dtype == "compute" else getattr(torch, recipe.train.adapter_dtype)
        full = meta_model(self.config, self.dtype, attn_implementation=attn)
        self.eager = full.config._attn_implementation == "eager"
        self.weights = weight_bytes(full, recipe.model.quantization)
        self.largest_weight = largest_quantized_weight(full) if recipe.model.quantization != "none" else 0
        self.adapters = adapter_bytes(attach_meta(full, self.adapter, adapter_dtype), recipe.train.optim)
        del full
        self.meter = ActivationMeter(self.config, self.adapter, self.dtype, self.device, adapter_dtype, attn)
        self.vocab = int(self.config.vocab_size)
        self.heads = int(getattr(self.config, "num_attention_heads", 0) or 0)
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or 0) or max(LENGTH_LADDER)

    def transient(self, batch: int, length: int) -> tuple[int, str]:
        """The largest temporary on top of what is kept, and its name. Loss: the backward of the cross
        entropy holds two fp32 [tokens, vocab] tensors besides the saved log-softmax (the nll gradient and
        the log-softmax gradient); bitsandbytes dequantizes one weight at a time in the compute dtype (and
        dequantizes again in backward); eager attention materialises [batch, heads, length, length] scores
        before the softmax (sdpa's fused kernels never do)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        candidates = {
            "fp32 logits (loss backward)": 2 * batch * length * self.vocab * FP32,
            "dequantized weight": self.largest_weight * element,
        }
        if self.eager:
            candidates["attention scores (eager)"] = batch * self.heads * length * length * element
        name = max(candidates, key=candidates.get)
        return candidates[name], name

    def plan(self, batch: int | None = None, length: int | None = None, accumulation: int | None = None) -> Plan:
        """The plan at the recipe's batch, length and gradient accumulation, or at the ones given."""
        r = self.recipe
        batch = batch or r.train.batch_size
        length = length or r.data.max_length
        accumulation = accumulation or r.train.gradient_accumulation
        ckpt = r.model.gradient_checkpointing
        acts = self.meter.measure(batch, length, ckpt)
        trainable = self.adapters.trainable
        transient, transient_name = self.transient(batch, length)
        parts = [
            Part("frozen weights, 4-bit packed", self.weights.packed, r.model.quantization),
            Part("quantization state", self.weights.quant_state, "absmax, double-quant constants, codes"),
            Part("unquantized weights", self.weights.unquantized, "embeddings, LM head, norms, buffers"),
            Part("adapter parameters", self.adapters.parameters, r.adapter.method),
            # gradient accumulation keeps the gradients through the next micro-batch's peak; without it they
            # are allocated in backward as the activations they come from are freed
            Part(
                "adapter gradients",
                trainable if accumulation > 1 else 0,
                "kept across micro-batches" if accumulation > 1 else "made as activations free",
            ),
            Part("optimizer state", self.adapters.optimizer, f"{r.train.optim}: exp_avg, exp_avg_sq"),
            Part("contrastive queues", acts.contrastive_state, "MoELoRA, both copies"),
            Part(
                "activations kept for backward",
                acts.saved,
                f"measured, checkpointing {'on' if ckpt else 'off'}, {batch}x{length}",
            ),
            Part("transient peak", transient, transient_name),
        ]
        tensors = sum(p.bytes for p in parts)
        if self.device == "cuda":
            allowance = CUDA_CONTEXT_BYTES + math.ceil(ALLOCATOR_OVERHEAD * tensors)
            parts.append(Part("CUDA context + allocator", allowance, "512 MiB + 10% of tensors"))
        return Plan(
            model=r.model.source,
            method=r.adapter.method,
            device=self.device,
            dtype=str(self.dtype).removeprefix("torch."),
            quantization=r.model.quantization,
            gradient_checkpointing=ckpt,
            batch_size=batch,
            max_length=length,
            gradient_accumulation=accumulation,
            parts=parts,
            peak_bytes=sum(p.bytes for p in parts),
            transient=transient_name,
        )

    def peak(self, batch: int, length: int, accumulation: int) -> int:
        return self.plan(batch, length, accumulation).peak_bytes

    def verdict(self, plan: Plan, vram_gib: float) -> Verdict:
        limit = vram_gib * GIB
        r = self.recipe
        effective = r.train.batch_size * r.train.gradient_accumulation
        # batch sizes that keep the effective batch exactly (batch x accumulation = effective)
        divisors = [b for b in range(1, effective + 1) if effective % b == 0]
        best_batch = _largest(lambda b: self.peak(b, plan.max_length, effective // b) <= limit, divisors)
        lengths = sorted({n for n in LENGTH_LADDER if n <= self.max_positions} | {plan.max_length})
        fitting = _prefix(lengths, lambda n: self.peak(1, n, effective) <= limit)
        return Verdict(
            vram_gib=vram_gib,
            fits=plan.peak_bytes <= limit,
            headroom_bytes=int(limit - plan.peak_bytes),
            batch_size=best_batch,
            gradient_accumulation=effective // best_batch if best_batch else None,
            max_length=fitting[-1] if fitting else None,
        )


_PLANNERS: dict[str, Planner] = {}
_PLANNERS_KEPT = 8
_PLANNERS_LOCK = threading.Lock()


def cached_planner(recipe: Recipe) -> Planner:
    """A planner for ``recipe``, reusing the one built for the same model and adapter (a form that changes
    batch or length re-plans in milliseconds: only the activation forward is new)."""
    built_from = [recipe.model.model_dump(mode="json"), recipe.adapter.to_dict()]
    built_from += [recipe.train.adapter_dtype, recipe.train.optim, [s.stage for s in recipe.train.stages or ()]]
    key = json.dumps(built_from, sort_keys=True)
    with _PLANNERS_LOCK:  # the UI's estimate runs in several threads
        built = _PLANNERS.get(key)
        if built is None:
            while len(_PLANNERS) >= _PLANNERS_KEPT:
                _PLANNERS.pop(next(iter(_PLANNERS)))
            built = _PLANNERS[key] = Planner(recipe)
    # a shallow copy per caller: batch, length, accumulation and the like may differ between callers; what
    # was built (meta model, weight and adapter bytes, the locked activation meter) is shared
    planner = copy.copy(built)
    planner.recipe = recipe
    return planner


def _largest(ok, values: list[int]) -> int | None:
    """The largest of the sorted ``values`` with ok(value), ok monotone (true up to some value); None when
    ok fails on the first (bisection: few plans)."""
    if not ok(values[0]):
        return None
    low, high = 0, len(values) - 1
    while low < high:
        mid = (low + high + 1) // 2
        if ok(values[mid]):
            low = mid
        else:
            high = mid - 1
    return values[low]


def _prefix(values: list[int], ok) -> list[int]:
    out = []
    for value in values:
        if not ok(value):
            break
        out.append(value)
    return out


def plan_recipe(recipe: Recipe, vram: tuple[float, ...] | list[float] = DEFAULT_VRAM) -> Plan:
    """The recipe's memory plan with a verdict per GPU size in ``vram`` (GiB)."""
    planner = cached_planner(recipe)
    plan = planner.plan()
    plan.verdicts = [planner.verdict(plan, size) for size in vram]
    return plan


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GB"


def render(plan: Plan) -> str:
    """The plan as a Markdown table and one verdict line per GPU size."""
    lines = [
        f"memory plan: {plan.model}, {plan.method}, {plan.quantization}, {plan.dtype} on {plan.device}, "
        f"batch {plan.batch_size} x length {plan.max_length} (gradient accumulation {plan.gradient_accumulation}), "
        f"gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
        "",
        "| part | size | note |",
        "|---|---:|---|",
    ]
    lines += [f"| {p.name} | {gib(p.bytes)} | {p.note} |" for p in plan.parts]
    lines += [f"| **peak** | **{gib(plan.peak_bytes)}** | |", ""]
    for v in plan.verdicts:
        verdict = "fits" if v.fits else "does NOT fit"
        if v.batch_size:
            best = (
                f"largest batch at length {plan.max_length}: {v.batch_size} "
                f"(gradient accumulation {v.gradient_accumulation})"
            )
        else:
            best = f"no batch fits at length {plan.max_length}"
        longest = f"longest length at batch 1: {v.max_length}" if v.max_length else "no length fits at batch 1"
        room = f"{gib(abs(v.headroom_bytes))} {'free' if v.fits else 'over'}"
        lines.append(f"{v.vram_gib:g} GB: {verdict} ({room}); {best}; {longest}")
    return "\n".join(lines)
