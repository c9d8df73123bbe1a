"""``qmoe bench``: what the MoE adapters cost next to PEFT LoRA and next to a per-expert Python loop.

Used by the ``qmoe bench`` command and by the scripts in ``benchmarks/``::

    from qmoe.bench import plan_for, run_bench
    result = run_bench(plan_for("cpu", quick=True))   # {"meta": {...}, "records": [...]}

Every record compares one thing with one baseline (``method``, ``baseline``, ``ratio_time``,
``ratio_peak_mem``, ``shapes``, ``device`` ...); see ``qmoe/bench/layer.py`` and ``qmoe/bench/step.py``.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..sysinfo import cpu_name
from .backbones import BUILTIN, GPU_ONLY


@dataclass
class LayerCase:
    backbone: str  # whose shape this layer has
    layer: str
    in_features: int
    out_features: int
    tokens: int


@dataclass
class StepCase:
    backbone: str
    batch: int
    seq: int
    layers: int | None = None  # decoder layers kept (None: all); the layer shapes stay the real ones


@dataclass
class BenchPlan:
    device: str
    layer_cases: list[LayerCase]
    layer_methods: list[str]
    step_cases: list[StepCase]
    step_methods: list[str]
    layer_repeats: int = 5
    step_repeats: int = 3
    warmup: int = 1
    memory: bool = True
    name: str = "custom"
    notes: list[str] = field(default_factory=list)


ALL_METHODS = ["moelora", "loracoe", "loramoe", "lora"]

SMOLLM2 = dict(q_proj=(576, 576), up_proj=(576, 1536), down_proj=(1536, 576))
LLAMA_1B = dict(q_proj=(2048, 2048), up_proj=(2048, 8192), down_proj=(8192, 2048))
LLAMA_7B = dict(q_proj=(4096, 4096), up_proj=(4096, 11008), down_proj=(11008, 4096))


def _layers(backbone, shapes, names, tokens):
    return [LayerCase(backbone, n, *shapes[n], tokens) for n in names]


def plan_for(device: str, quick: bool = False) -> BenchPlan:
    """The standard plans: ``quick`` fits in under 5 minutes on a 2-core CPU; the full one takes longer."""
    if device == "cuda":
        if quick:
            return BenchPlan(
                device,
                _layers(BUILTIN, SMOLLM2, ["q_proj", "up_proj"], 4096)
                + _layers("llama-1b", LLAMA_1B, ["up_proj"], 4096),
                ALL_METHODS,
                [StepCase(BUILTIN, 8, 512), StepCase("llama-1b", 4, 512)],
                ["moelora", "loracoe"],
                layer_repeats=10,
                step_repeats=5,
                warmup=2,
                name="quick",
            )
        return BenchPlan(
            device,
            _layers(BUILTIN, SMOLLM2, ["q_proj", "up_proj", "down_proj"], 8192)
            + _layers("llama-1b", LLAMA_1B, ["q_proj", "up_proj", "down_proj"], 8192)
            + _layers("llama-7b", LLAMA_7B, ["q_proj", "up_proj", "down_proj"], 8192),
            ALL_METHODS,
            [StepCase(BUILTIN, 8, 1024), StepCase("llama-1b", 4, 1024), StepCase("llama-7b", 2, 1024)],
            ALL_METHODS + ["moelora-nocl"],
            layer_repeats=20,
            step_repeats=7,
            warmup=3,
            name="full",
        )
    if quick:
        return BenchPlan(
            device,
            _layers(BUILTIN, SMOLLM2, ["q_proj", "up_proj"], 512) + _layers("llama-1b", LLAMA_1B, ["q_proj"], 256),
            ALL_METHODS,
            [StepCase(BUILTIN, 2, 128, layers=4)],
            ["moelora", "loracoe", "moelora-nocl"],
            layer_repeats=5,
            step_repeats=3,
            warmup=1,
            name="quick",
            notes=["SmolLM2-135M steps keep its first 4 of 30 decoder layers (real layer shapes) to fit in 5 minutes"],
        )
    # CPU full plan: sized for about 30 minutes on a shared 2-core machine, hence truncated depths
    return BenchPlan(
        device,
        _layers(BUILTIN, SMOLLM2, ["q_proj", "up_proj", "down_proj"], 1024)
        + _layers("llama-1b", LLAMA_1B, ["q_proj", "up_proj", "down_proj"], 256),
        ALL_METHODS,
        [StepCase(BUILTIN, 2, 256, layers=8), StepCase("llama-1b", 1, 128, layers=1)],
        ALL_METHODS + ["moelora-nocl"],
        layer_repeats=7,
        step_repeats=4,
        warmup=1,
        name="full",
        notes=[
            "SmolLM2-135M steps keep 8 of its 30 decoder layers, llama-1b steps 1 of 16 (real layer shapes): "
            "a full-depth step takes minutes on this CPU",
        ],
    )


def machine_info(device: str) -> dict:
    cpu = cpu_name()
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu,
    }
    for package in ("bitsandbytes", "peft", "transformers", "triton"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_bench(plan: BenchPlan, progress: Callable[[str], None] | None = None) -> dict:
    """Run a plan; returns {"meta": {...}, "records": [...]}. ``progress(message)`` is told what runs."""
    from .layer import bench_layer
    from .step import bench_steps

    start = time.perf_counter()
    say = (lambda msg: progress(f"[{time.perf_counter() - start:5.0f}s] {msg}")) if progress else None
    meta = dict(
        machine_info(plan.device),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        plan=asdict(plan),
        load_average_start=_load(),
    )
    records = []
    for case in plan.layer_cases:
        if case.backbone in GPU_ONLY and plan.device != "cuda":
            continue
        records += bench_layer(
            f"{case.backbone}.{case.layer}",
            case.in_features,
            case.out_features,
            case.tokens,
            plan.layer_methods,
            plan.device,
            plan.layer_repeats,
            plan.warmup,
            say,
        )
    for case in plan.step_cases:
        if case.backbone in GPU_ONLY and plan.device != "cuda":
            continue
        records += bench_steps(
            case.backbone,
            plan.step_methods,
            plan.device,
            case.batch,
            case.seq,
            plan.step_repeats,
            plan.warmup,
            layers=case.layers,
            memory=plan.memory,
            progress=say,
        )
    meta["load_average_end"] = _load()
    meta["seconds"] = round(time.perf_counter() - start, 1)
    return {"meta": meta, "records": records}


__all__ = ["ALL_METHODS", "BenchPlan", "LayerCase", "StepCase", "machine_info", "plan_for", "run_bench"]
