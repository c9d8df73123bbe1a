"""transformers ``Trainer`` adapted to qmoe adapters.

* ``compute_loss`` adds ``qmoe.aux_loss`` to the LM loss and records the parts, tokens and expert load that
  ``metrics.jsonl`` reports (``qmoe.callbacks``); a non-finite loss stops training naming the step.
* checkpoints hold only the adapter, the MoELoRA queues and Trainer's resumable state, and are complete or
  absent (``qmoe.checkpoints``); the data order continues across stages (``qmoe.sampling``).

Trainer's private extension points are reached only through ``qmoe.hf_private.TrainerHooks``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from . import aux_loss, aux_loss_parts, clear_aux, expert_load
from .callbacks import IntervalStats
from .checkpoints import load_checkpoint, prune_checkpoints, save_queues, write_checkpoint
from .errors import UsageError
from .hf_private import TrainerHooks, mean_loss_per_micro_batch, remove_log_printers
from .sampling import DataStreamSampler
from .serialization import save_adapter

log = logging.getLogger("qmoe")


class NonFiniteLoss(UsageError):
    """The loss became NaN or infinite."""


def lr_advice(lr: float) -> str:
    return f"Lower the learning rate (it is {lr:g}): start again with --overwrite train.lr={min(lr / 10, 2e-4):g}"


def adapter_is_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


class QmoeTrainer(TrainerHooks):
    """Trainer for a 4-bit model carrying a qmoe adapter (see module docstring). It prints nothing itself:
    ``qmoe.callbacks.ProgressBar`` and ``MetricsCallback`` do."""

    def __init__(
        self, *args: Any, stage: str | None = None, step_offset: int = 0, keep_checkpoints: int = 2, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        mean_loss_per_micro_batch(self)
        remove_log_printers(self)
        self.qmoe_stage = stage
        self.step_offset = step_offset
        self.keep_checkpoints = keep_checkpoints
        self.interval = IntervalStats()

    def train_sampler(self, dataset: Dataset) -> Sampler:
        """Stage k continues the data order where stage k-1 stopped (see ``qmoe.sampling``)."""
        consumed = self.step_offset * self.args.train_batch_size * self.args.gradient_accumulation_steps
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return DataStreamSampler(len(dataset), seed=seed, start=consumed)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        clear_aux(model)
        outputs = model(**inputs)
        lm_loss = outputs.loss
        parts = {k: v.detach() for k, v in aux_loss_parts(model).items()}
        loss = lm_loss + aux_loss(model)
        clear_aux(model)  # the graph lives on in ``loss``; drop the layers' references
        value = float(loss.detach())
        if model.training:
            self.interval.add(
                value,
                float(lm_loss.detach()),
                parts,
                int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(inputs["input_ids"].numel()),
                expert_load(model),
            )
        if not torch.isfinite(loss.detach()):
            step = self.step_offset + self.state.global_step + 1
            raise NonFiniteLoss(
                f"loss became {value} at step {step} (lm_loss={float(lm_loss.detach())}); training stopped, the last "
                f"good checkpoint is kept. {lr_advice(self.args.learning_rate)}"
            )
        return (loss, outputs) if return_outputs else loss

    # -- checkpoints: adapter only, staged then renamed --------------------------------------------------

    def save_model_files(self, directory: Path) -> None:
        save_adapter(self.model, directory)

    def save_checkpoint(self) -> None:
        if not adapter_is_finite(self.model):
            step = self.step_offset + self.state.global_step
            raise NonFiniteLoss(
                f"adapter weights became NaN/inf at step {step}; not saving them, the last good checkpoint is kept. "
                f"{lr_advice(self.args.learning_rate)}"
            )
        root = Path(self.args.output_dir)
        step = self.state.global_step

        def write(staging: Path) -> None:
            save_adapter(self.model, staging)
            save_queues(self.model, staging)
            self.save_training_state(staging)

        marker = {"step": step, "global_step": self.step_offset + step, "stage": self.qmoe_stage}
        final = write_checkpoint(root, step, marker, write)
        log.info("checkpoint saved: %s", final)
        prune_checkpoints(root, self.keep_checkpoints)

    def load_checkpoint(self, directory: Path, model: nn.Module) -> None:
        load_checkpoint(model, directory)
