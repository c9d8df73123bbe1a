"""transformers ``Trainer`` adapted to qmoe adapters.

* ``compute_loss`` adds ``qmoe.aux_loss`` to the LM loss and records the parts, tokens and expert load that
  ``metrics.jsonl`` reports (``qmoe.callbacks``); a non-finite loss stops training naming the step.
* checkpoints hold only the adapter, the MoELoRA queues and Trainer's resumable state, and are complete or
  absent (``qmoe.checkpoints``); the data order continues across stages (``qmoe.sampling``).

Trainer's private extension points are reached only through ``qmoe.hf_private.TrainerHooks``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from . import aux_loss, aux_loss_parts, clear_aux, distributed, expert_load
from .callbacks import IntervalStats, tracker_metrics
from .checkpoints import load_checkpoint, prune_checkpoints, save_queues, write_checkpoint
from .errors import UsageError
from .hf_private import TrainerHooks, mean_loss_per_micro_batch, remove_log_printers
from .routing import routing
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log, with qmoe's own numbers added to a training step's logs (LM and auxiliary losses,
        tokens/s, routing load), so every tracker of ``train.report_to`` receives what metrics.jsonl holds."""
        if "loss" in logs and self.interval.count:
            logs = {**logs, **tracker_metrics(self.interval.summary())}
        super().log(logs, start_time)

    def train_sampler(self, dataset: Dataset) -> Sampler:
        """Stage k continues the data order where stage k-1 stopped (see ``qmoe.sampling``)."""
        consumed = (
            self.step_offset * self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        )
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
        aux = aux_loss(model)
        clear_aux(model)  # the graph lives on in ``loss``; drop the layers' references
        tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(inputs["input_ids"].numel())
        if distributed.world_size() > 1:
            loss, value, lm_value, parts, tokens, load = self._global_batch(model, inputs, outputs, aux, parts, tokens)
        else:
            loss = lm_loss + aux
            value, lm_value, load = float(loss.detach()), float(lm_loss.detach()), None
        if model.training:
            self.interval.add(value, lm_value, parts, tokens, expert_load(model) if load is None else load)
        if not math.isfinite(value):
            step = self.step_offset + self.state.global_step + 1
            raise NonFiniteLoss(
                f"loss became {value} at step {step} (lm_loss={lm_value}); training stopped, the last "
                f"good checkpoint is kept. {lr_advice(self.args.learning_rate)}"
            )
        return (loss, outputs) if return_outputs else loss

    def _global_batch(
        self, model: nn.Module, inputs: dict, outputs: Any, aux: torch.Tensor, parts: dict, tokens: int
    ) -> tuple[torch.Tensor, float, float, dict, int, dict[str, list[float]]]:
        """Data parallel: the loss to differentiate, and the numbers metrics.jsonl reports, of the global batch
        (every process's micro-batch together), from one all-reduce.

        The LM loss is a mean over the label tokens of the global micro-batch: this process's mean is weighted
        by its share of them, ``lm * n * W / n_global``, so DDP's gradient average equals the gradient of one
        process training on the whole global batch. The auxiliary losses are already per-process shares of
        the global batch (see ``load_balancing_loss``) and are averaged. Expert load: every layer's
        fractions weighted by its tokens, summed, renormalised."""
        processes = distributed.world_size()
        labels = inputs.get("labels")
        # the label tokens the causal LM loss averages over (its labels shifted by one)
        n = int((labels[:, 1:] != -100).sum()) if labels is not None else tokens
        lm_loss = outputs.loss
        layers = {name: info for name, info in routing(model).items()}
        local = [
            float(n),
            float(lm_loss.detach()) * n if n else 0.0,
            float(aux.detach()),
            float(parts.get("balance", 0.0)),
            float(parts.get("contrastive", 0.0)),
            float(tokens),
        ]
        for info in layers.values():
            local += [f * info["tokens"] for f in info["load"]] + [float(info["tokens"])]
        sums = distributed.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        n_global = sums[0]
        lm_value = sums[1] / n_global if n_global else math.nan
        aux_value = sums[2] / processes
        if n:
            loss = lm_loss * (n * processes / n_global) + aux
        else:  # no label token here: zero gradient, every trainable parameter still in the graph (DDP)
            loss = outputs.logits.sum() * 0.0 + aux
        global_parts = {k: sums[3 + i] / processes for i, k in enumerate(("balance", "contrastive")) if k in parts}
        load, at = {}, 6
        for name, info in layers.items():
            experts = len(info["load"])
            weighted, total = sums[at : at + experts], sums[at + experts]
            load[name] = [w / total for w in weighted] if total else [1.0 / experts] * experts
            at += experts + 1
        return loss, lm_value + aux_value, lm_value, global_parts, int(sums[5]), load

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

        def write(staging: Path) -> None:  # the main process
            save_adapter(self.model, staging)
            save_queues(self.model, staging)

        marker = {"step": step, "global_step": self.step_offset + step, "stage": self.qmoe_stage}
        final = write_checkpoint(root, step, marker, write, write_each=self.save_training_state)
        log.info("checkpoint saved: %s", final)
        distributed.on_main(prune_checkpoints, root, self.keep_checkpoints)

    def load_checkpoint(self, directory: Path, model: nn.Module) -> None:
        load_checkpoint(model, directory)
