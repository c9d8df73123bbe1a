"""The plan inside ``qmoe finetune``: ``plan.json`` in the run directory before the model is loaded, a warning
when the run is predicted not to fit the detected GPU, and planned vs measured peak in train.log at the end.

Planning never stops a run: if it fails (an architecture transformers cannot build on meta, say), the run
goes on and the log says why there is no plan.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io import atomic_write_json
from ..rundir import PLAN
from .report import GIB, Plan, gib, plan_recipe

if TYPE_CHECKING:
    from ..recipe import Recipe

log = logging.getLogger("qmoe")

ALLOWANCE_PART = "CUDA context + allocator"


def detected_gpu_gib() -> float | None:
    """Memory of this process's GPU in GiB, None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def tensor_peak(plan: Plan) -> int:
    """The planned peak of tensor memory alone (what torch.cuda.max_memory_allocated measures)."""
    return plan.peak_bytes - sum(p.bytes for p in plan.parts if p.name == ALLOWANCE_PART)


def plan_run(recipe: Recipe, run_dir: Path) -> Plan | None:
    """Plan the recipe for the detected GPU (or none), write ``run_dir/plan.json``, warn when it will not fit."""
    gpu = detected_gpu_gib() if recipe.model.device != "cpu" else None
    try:
        plan = plan_recipe(recipe, (gpu,) if gpu else ())
    except Exception as exc:  # noqa: BLE001 - a plan is advice; the run itself decides
        log.warning("memory plan unavailable: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    atomic_write_json(run_dir / PLAN, {**plan.to_dict(), "detected_gpu_gib": gpu})
    log.info(
        "memory plan: peak %s (%s, batch %d x length %d); see %s",
        gib(plan.peak_bytes),
        plan.device,
        plan.batch_size,
        plan.max_length,
        run_dir / PLAN,
    )
    if gpu and not plan.verdicts[0].fits:
        v = plan.verdicts[0]
        advice = (
            f"train.batch_size={v.batch_size} train.gradient_accumulation={v.gradient_accumulation}"
            if v.batch_size
            else "a shorter data.max_length, model.gradient_checkpointing=true or a smaller model"
        )
        log.warning(
            "memory plan: this run needs about %s but the GPU has %.1f GB: it will likely run out of memory; "
            "try %s (qmoe plan shows the options)",
            gib(plan.peak_bytes),
            gpu,
            advice,
        )
    return plan


def log_planned_vs_measured(plan: Plan | None, device: str) -> None:
    """train.log's last word on memory: the planned peak beside the measured one."""
    if plan is None:
        return
    if device == "cuda" and torch.cuda.is_available():
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        log.info(
            "memory: planned tensor peak %s, measured (torch.cuda.max_memory_allocated) %s (%+.0f%%); planned with "
            "context and allocator %s, measured reserved %s",
            gib(tensor_peak(plan)),
            gib(allocated),
            100 * (tensor_peak(plan) / allocated - 1) if allocated else 0.0,
            gib(plan.peak_bytes),
            gib(reserved),
        )
        return
    from ..sysinfo import peak_rss_bytes

    log.info(
        "memory: planned tensor peak %s; measured peak RSS %s (the whole process: Python, libraries, data "
        "included, so above the tensors alone)",
        gib(tensor_peak(plan)),
        gib(peak_rss_bytes()),
    )
