"""transformers ``Trainer`` adapted to qmoe adapters.

* ``compute_loss`` adds ``qmoe.aux_loss`` to the LM loss and records the parts, tokens and expert load that
  ``metrics.jsonl`` reports; a non-finite loss stops training naming the step.
* checkpoints hold only the adapter (``qmoe.save_adapter``), the MoELoRA contrastive queues, optimizer,
  scheduler, RNG and trainer state. Each is written into a staging folder, fsynced, and renamed into place,
  so ``checkpoints/`` only ever contains complete checkpoints; the newest ``keep`` are kept.
* ``MetricsCallback`` writes ``metrics.jsonl`` and ``status.json`` and turns SIGINT/SIGTERM into
  "save a checkpoint, then stop".
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from transformers import Trainer, TrainerCallback

from . import aux_loss, aux_loss_parts, clear_aux, expert_load
from .attach import adapter_layers
from .cli import UsageError
from .io import atomic_write_bytes, atomic_write_json, fsync_dir, replace_dir
from .sampling import DataStreamSampler
from .serialization import AdapterError, load_adapter, save_adapter

log = logging.getLogger("qmoe")

QUEUES_FILE = "queues.safetensors"
MARKER_FILE = "qmoe_checkpoint.json"  # written last: its presence means the checkpoint is complete
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteLoss(UsageError):
    """The loss became NaN or infinite."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded; the message names the file."""


# ------------------------------------------------------------------------------------------- checkpoints


def save_queues(model, directory: Path) -> None:
    """MoELoRA contrastive queues (recent expert outputs and their expert ids) of every layer."""
    tensors = {}
    for name, layer in adapter_layers(model).items():
        if getattr(layer, "queue", None) is not None:
            tensors[f"{name}.queue"] = layer.queue.detach().to("cpu").contiguous()
            tensors[f"{name}.queue_labels"] = layer.queue_labels.detach().to("cpu").contiguous()
    atomic_write_bytes(directory / QUEUES_FILE, save(tensors))


def load_queues(model, directory: Path) -> None:
    path = directory / QUEUES_FILE
    if not path.is_file():
        return
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise CheckpointError(f"{path} is corrupt or truncated ({exc})") from None
    for name, layer in adapter_layers(model).items():
        if f"{name}.queue" in tensors and hasattr(layer, "queue"):
            device = next(p.device for p in layer.parameters())
            layer.queue = tensors[f"{name}.queue"].to(device)
            layer.queue_labels = tensors[f"{name}.queue_labels"].to(device)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (marker written), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir() and (path / MARKER_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> None:
    """Open every file of a checkpoint; CheckpointError naming the first damaged one."""
    from .serialization import WEIGHTS_FILE, read_adapter_config

    try:
        read_adapter_config(path)
        load_file(str(path / WEIGHTS_FILE))
    except AdapterError as exc:
        raise CheckpointError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path / WEIGHTS_FILE} is corrupt or truncated ({exc})") from None
    for name in CHECKPOINT_FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: incomplete checkpoint")
        try:
            torch.load(file, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{file} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
    try:
        json.loads((path / TRAINER_STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / TRAINER_STATE_FILE} is missing or corrupt ({exc})") from None


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def lr_advice(lr: float) -> str:
    return f"Lower the learning rate (it is {lr:g}): start again with --overwrite train.lr={min(lr / 10, 2e-4):g}"


def adapter_is_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------- trainer


class IntervalStats:
    """Sums over the micro-batches since the last metrics line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.loss = self.lm = self.balance = self.contrastive = 0.0
        self.tokens = 0
        self.load: dict[str, torch.Tensor] = {}
        self.started = time.perf_counter()

    def add(self, loss: float, lm: float, parts: dict, tokens: int, load: dict[str, list[float]]) -> None:
        self.count += 1
        self.loss += loss
        self.lm += lm
        self.balance += float(parts.get("balance", 0.0))
        self.contrastive += float(parts.get("contrastive", 0.0))
        self.tokens += tokens
        for name, fractions in load.items():
            value = torch.tensor(fractions, dtype=torch.float64)
            self.load[name] = self.load[name] + value if name in self.load else value

    def summary(self) -> dict:
        n = max(self.count, 1)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        load = {
            name: (total / total.sum()).tolist() if total.sum() > 0 else total.tolist()
            for name, total in self.load.items()
        }
        return {
            "loss": self.loss / n,
            "lm_loss": self.lm / n,
            "balance_loss": self.balance / n,
            "contrastive_loss": self.contrastive / n,
            "tokens_per_s": self.tokens / elapsed,
            "expert_load": load,
        }


class QmoeTrainer(Trainer):
    """Trainer for a 4-bit model carrying a qmoe adapter (see module docstring)."""

    def __init__(self, *args, stage: str | None = None, step_offset: int = 0, keep_checkpoints: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        # per-micro-batch mean losses; Trainer then divides by the accumulation steps itself
        self.model_accepts_loss_kwargs = False
        self.qmoe_stage = stage
        self.step_offset = step_offset
        self.keep_checkpoints = keep_checkpoints
        self.interval = IntervalStats()

    def _get_train_sampler(self, train_dataset=None):
        """Stage k continues the data order where stage k-1 stopped (see ``qmoe.sampling``)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        consumed = self.step_offset * self.args.train_batch_size * self.args.gradient_accumulation_steps
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return DataStreamSampler(len(dataset), seed=seed, start=consumed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        save_adapter(self.model, output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        if not adapter_is_finite(self.model):
            step = self.step_offset + self.state.global_step
            raise NonFiniteLoss(
                f"adapter weights became NaN/inf at step {step}; not saving them, the last good checkpoint is kept. "
                f"{lr_advice(self.args.learning_rate)}"
            )
        root = Path(self.args.output_dir)
        root.mkdir(parents=True, exist_ok=True)
        step = self.state.global_step
        final = root / f"checkpoint-{step}"
        staging = root / f".staging-checkpoint-{step}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            self.store_flos()
            save_adapter(self.model, staging)
            save_queues(self.model, staging)
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))
            self._store_callback_states()
            self.state.save_to_json(str(staging / TRAINER_STATE_FILE))
            atomic_write_json(
                staging / MARKER_FILE,
                {"step": step, "global_step": self.step_offset + step, "stage": self.qmoe_stage, "complete": True},
            )
            _fsync_tree(staging)
            replace_dir(staging, final)  # re-saving a step after a resume replaces the old copy
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("checkpoint saved: %s", final)
        for stale in complete_checkpoints(root)[: -self.keep_checkpoints]:
            shutil.rmtree(stale, ignore_errors=True)

    def _store_callback_states(self) -> None:
        from transformers.trainer_callback import ExportableState

        for cb in [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        try:
            load_adapter(model, resume_from_checkpoint)
        except AdapterError as exc:
            raise CheckpointError(str(exc)) from None
        load_queues(model, Path(resume_from_checkpoint))


# ------------------------------------------------------------------------------------------- callback


class StopRequest:
    """Set by the SIGINT/SIGTERM handler; the callback then saves a checkpoint and stops training."""

    def __init__(self):
        self.signal_name: str | None = None
        self.signum = 0


def peak_memory_mb(device: str) -> float:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsCallback(TrainerCallback):
    """Writes one metrics.jsonl record per logging step and keeps status.json current."""

    def __init__(self, metrics, status, stop: StopRequest, device: str, total_steps_after: int = 0):
        self.metrics = metrics
        self.status = status
        self.stop = stop
        self.device = device
        self.total_steps_after = total_steps_after  # steps of the stages still to come (for status.max_steps)
        self.trainer: QmoeTrainer | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        self.status.update(
            step=t.step_offset + state.global_step,
            max_steps=t.step_offset + state.max_steps + self.total_steps_after,
            stage=t.qmoe_stage,
        )
        t.interval.reset()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True  # always end a stage with a checkpoint (resume and next stage use it)
            control.should_log = True
        if self.stop.signal_name is not None:
            log.warning(
                "%s received: saving a checkpoint at step %d, then stopping",
                self.stop.signal_name,
                self.trainer.step_offset + state.global_step,
            )
            control.should_save = True
            control.should_training_stop = True
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        t = self.trainer
        if "loss" not in logs or t.interval.count == 0:
            return
        step = t.step_offset + state.global_step
        record = {"step": step, "epoch": round(float(state.epoch or 0.0), 4)}
        summary = t.interval.summary()
        record.update({k: summary[k] for k in ("loss", "lm_loss", "balance_loss", "contrastive_loss")})
        record["lr"] = float(logs.get("learning_rate", 0.0))
        record["tokens_per_s"] = round(summary["tokens_per_s"], 2)
        record["peak_mem_mb"] = round(peak_memory_mb(self.device), 1)
        record["stage"] = t.qmoe_stage
        record["expert_load"] = summary["expert_load"]
        self.metrics.append(record)
        t.interval.reset()
        self.status.update(step=step, stage=t.qmoe_stage)
        log.info(
            "step %d  loss %.4f  lm %.4f  lr %.2e  %.0f tok/s",
            step,
            record["loss"],
            record["lm_loss"],
            record["lr"],
            record["tokens_per_s"],
        )
