"""The Train tab's memory estimate: ``qmoe plan`` of the form's recipe (the same planner, cached per model
and adapter so edits re-plan quickly), and whether the run is predicted not to fit this machine's GPU."""

from __future__ import annotations

from dataclasses import dataclass

from qmoe.errors import UsageError
from qmoe.plan.report import cached_planner, gib, planned_device
from qmoe.plan.run import detected_gpu_gib
from qmoe.recipe import Recipe


@dataclass
class Estimate:
    markdown: str
    too_big: bool  # predicted not to fit the detected GPU (never without a GPU)
    peak_bytes: int | None = None
    gpu_gib: float | None = None


def memory_estimate(recipe: Recipe) -> Estimate:
    gpu = detected_gpu_gib() if planned_device(recipe.model.device) == "cuda" else None
    try:
        planner = cached_planner(recipe)
        plan = planner.plan()
    except (UsageError, ValueError, OSError) as exc:
        return Estimate(f"**Memory estimate:** unavailable ({str(exc).splitlines()[0]})", False)
    largest = sorted(plan.parts, key=lambda p: -p.bytes)[:3]
    where = f"{plan.device}, {plan.dtype}, batch {plan.batch_size} x length {plan.max_length}"
    text = f"**Memory estimate:** peak **{gib(plan.peak_bytes)}** ({where}); largest parts: " + ", ".join(
        f"{p.name} {gib(p.bytes)}" for p in largest
    )
    if gpu is None:
        return Estimate(text + ". No GPU detected for this run: estimate only.", False, plan.peak_bytes)
    verdict = planner.verdict(plan, gpu)
    if verdict.fits:
        return Estimate(text + f". Fits the detected GPU ({gpu:.1f} GB).", False, plan.peak_bytes, gpu)
    advice = (
        f"batch size {verdict.batch_size} with gradient accumulation {verdict.gradient_accumulation} fits"
        if verdict.batch_size
        else "lower the max length or turn gradient checkpointing on"
    )
    return Estimate(
        text + f". **Predicted NOT to fit the detected GPU ({gpu:.1f} GB)**: {advice}.", True, plan.peak_bytes, gpu
    )
