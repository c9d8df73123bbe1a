"""What a fine-tune reports while it trains, and how it stops.

* :class:`MetricsCallback` writes one ``metrics.jsonl`` record per logging step, keeps ``status.json``
  current, logs the same numbers as one line, and turns a SIGINT/SIGTERM (:class:`StopRequest`) into
  "save a checkpoint, then stop".
* The terminal gets one voice: :class:`ProgressBar` (steps of the whole run, with ETA) replaces Trainer's bar
  and its printed log dicts, and :class:`ConsoleHandler` writes qmoe's log lines through the bar, so each
  logging step shows as exactly one line and the bar is redrawn below it, never torn.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from types import FrameType
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import distributed
from .rundir import MetricsLog, StatusFile
from .sysinfo import peak_rss_bytes

log = logging.getLogger("qmoe")


class IntervalStats:
    """Sums over the micro-batches since the last metrics line (filled by ``QmoeTrainer.compute_loss``)."""

    def __init__(self) -> None:
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


def tracker_metrics(summary: dict) -> dict[str, float]:
    """Scalars of an :meth:`IntervalStats.summary` for experiment trackers (``train.report_to``).

    Per-layer loads would be hundreds of series, so routing is summarised over the adapted layers:
    ``routing/max_load`` is the mean over layers of (largest expert share x experts), 1 under uniform routing
    and N when collapsed onto one expert; ``routing/entropy`` the mean normalised entropy of the shares (1 =
    uniform); ``routing/expert_<i>`` expert i's share averaged over layers. The heatmap per layer stays in
    metrics.jsonl (and the UI)."""
    metrics = {k: float(summary[k]) for k in ("lm_loss", "balance_loss", "contrastive_loss", "tokens_per_s")}
    loads = [torch.tensor(v, dtype=torch.float64) for v in summary.get("expert_load", {}).values() if len(v) > 1]
    if loads and len({len(v) for v in loads}) == 1:
        shares = torch.stack(loads)  # [layers, experts]
        experts = shares.shape[1]
        metrics["routing/max_load"] = float((shares.max(1).values * experts).mean())
        entropy = -(shares * shares.clamp_min(1e-12).log()).sum(1) / math.log(experts)
        metrics["routing/entropy"] = float(entropy.mean())
        for i, share in enumerate(shares.mean(0).tolist()):
            metrics[f"routing/expert_{i}"] = share
    return metrics


# ------------------------------------------------------------------------------------------- signals


class StopRequest:
    """Set by the SIGINT/SIGTERM handler; the callback then saves a checkpoint and stops training."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.signum = 0

    def agree(self) -> bool:
        """Whether to stop now. Data parallel: a signal that reached any process stops every process at the
        same point (one all-reduce; the processes call this at the same places), so they save one consistent
        checkpoint instead of one waiting forever in a collective the others never join."""
        if distributed.world_size() == 1:
            return self.signal_name is not None
        signum = distributed.all_reduce_max(self.signum)
        if signum and self.signal_name is None:
            self.signal_name, self.signum = signal.Signals(signum).name, signum
        return signum != 0


def install_signal_handlers(stop: StopRequest, second_stops_now: bool = True) -> dict[int, object]:
    """SIGINT/SIGTERM set ``stop`` (a second one raises KeyboardInterrupt: stop now, unless
    ``second_stops_now`` is False); returns the previous handlers for :func:`restore_signal_handlers`. Nothing
    is installed outside the main thread."""
    previous: dict[int, object] = {}

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.signal_name is not None:  # second signal: stop now
            if not second_stops_now:
                return
            raise KeyboardInterrupt
        stop.signal_name = signal.Signals(signum).name
        stop.signum = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. called from a UI worker): no handlers
            pass
    return previous


def restore_signal_handlers(previous: dict[int, object]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


# ------------------------------------------------------------------------------------------- metrics


def peak_memory_mb(device: str) -> float:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_bytes() / 2**20


def step_line(record: dict, max_steps: int | None = None) -> str:
    """The terminal and train.log line of one metrics.jsonl record."""
    step = f"step {record['step']}" + (f"/{max_steps}" if max_steps else "")
    parts = [
        step,
        f"loss {record['loss']:.4f}",
        f"lm_loss {record['lm_loss']:.4f}",
        f"balance_loss {record['balance_loss']:.4f}",
        f"contrastive_loss {record['contrastive_loss']:.4f}",
        f"lr {record['lr']:.2e}",
        f"{record['tokens_per_s']:.0f} tok/s",
        f"peak_mem {record['peak_mem_mb']:.0f} MB",
    ]
    if record.get("stage"):
        parts.append(f"stage {record['stage']}")
    return "  ".join(parts)


class MetricsCallback(TrainerCallback):
    """Writes one metrics.jsonl record per logging step, keeps status.json current, logs the record as one
    line, and stops at a checkpoint when a signal arrived. ``trainer`` (a ``QmoeTrainer``) is set after the
    trainer is built: its ``interval`` holds the sums, its ``step_offset`` and ``qmoe_stage`` the position."""

    def __init__(
        self, metrics: MetricsLog, status: StatusFile, stop: StopRequest, device: str, total_steps_after: int = 0
    ):
        self.metrics = metrics
        self.status = status
        self.stop = stop
        self.device = device
        self.total_steps_after = total_steps_after  # steps of the stages still to come (for status.max_steps)
        self.trainer = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        t = self.trainer
        self.status.update(
            step=t.step_offset + state.global_step,
            max_steps=t.step_offset + state.max_steps + self.total_steps_after,
            stage=t.qmoe_stage,
        )
        t.interval.reset()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_save = True  # always end a stage with a checkpoint (resume and next stage use it)
            control.should_log = True
        if self.stop.agree():
            log.warning(
                "%s received: saving a checkpoint at step %d, then stopping",
                self.stop.signal_name,
                self.trainer.step_offset + state.global_step,
            )
            control.should_save = True
            control.should_training_stop = True
            control.should_log = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
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
        log.info("%s", step_line(record, self.status.data.get("max_steps")))


# ------------------------------------------------------------------------------------------- terminal


class ProgressBar(TrainerCallback):
    """One tqdm bar over the steps of the whole run (continuing across stages and resumes), with ETA.
    Replaces Trainer's bar, which counts one stage only and prints every log as a dict."""

    def __init__(self, step_offset: int = 0, steps_after: int = 0, stage: str | None = None):
        self.step_offset = step_offset
        self.steps_after = steps_after  # steps of the stages still to come
        self.stage = stage
        self.bar: tqdm | None = None
        self.shown = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self.shown = state.global_step
        self.bar = tqdm(
            total=self.step_offset + state.max_steps + self.steps_after,
            initial=self.step_offset + state.global_step,
            desc=f"train ({self.stage})" if self.stage else "train",
            unit="step",
            dynamic_ncols=True,
            # TQDM_DISABLE=1 in the environment also turns it off (tqdm reads it when disable is not passed)
            **({"disable": True} if args.disable_tqdm else {}),
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.shown)
            self.shown = state.global_step

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleHandler(logging.Handler):
    """qmoe's log on stderr, written through tqdm: an active bar is cleared, the line printed, the bar
    redrawn below it. Resolves ``sys.stderr`` at each line (so redirected or captured stderr gets it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the training loop
            self.handleError(record)
