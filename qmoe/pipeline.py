"""``qmoe finetune`` end to end: recipe -> 4-bit model + adapter -> Trainer stages -> adapter/ -> eval.json.

Owns the run directory (see ``qmoe.rundir``) and turns every expected failure into one clear line
(``UsageError``, exit status 2) recorded in ``status.json``; a signal stops at a checkpoint with status
128+signal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import distributed
from .config import AdapterConfig
from .errors import UsageError
from .io import atomic_write_json, atomic_write_text, replace_dir
from .recipe import PAGED_OPTIMIZERS, Recipe, Stage, dump_recipe
from .rundir import (
    ADAPTER,
    CHECKPOINTS,
    EVAL,
    LOG,
    RECIPE,
    REPLACED_PREFIX,
    STAGE_DONE,
    STAGING_PREFIX,
    MetricsLog,
    RunLock,
    StatusFile,
    prepare_run_dir,
)

if TYPE_CHECKING:  # imported lazily below: transformers is slow to import
    from transformers import TrainingArguments

    from .callbacks import StopRequest

log = logging.getLogger("qmoe")

OOM_ADVICE = (
    "lower train.batch_size (raise train.gradient_accumulation to keep the effective batch), lower "
    "data.max_length, or set model.gradient_checkpointing=true"
)


def setup_logging(log_file: Path | None, level: int = logging.INFO) -> list[logging.Handler]:
    """qmoe's log to stderr (through the progress bar) and (appending) to train.log; returns the handlers to
    remove afterwards."""
    from .callbacks import ConsoleHandler

    log.setLevel(level)
    log.propagate = False
    handlers: list[logging.Handler] = []
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if not any(isinstance(h, ConsoleHandler) for h in log.handlers):
        console = ConsoleHandler()
        console.setFormatter(fmt)
        log.addHandler(console)
        handlers.append(console)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(fmt)
        log.addHandler(file_handler)
        handlers.append(file_handler)
    return handlers


def stage_roots(checkpoints: Path, plan: list[Stage | None]) -> list[Path]:
    """The checkpoints folder of each stage: ``checkpoints/`` itself, or ``checkpoints/<i>-<stage>/``."""
    if len(plan) == 1:
        return [checkpoints]
    return [checkpoints / f"{i + 1}-{stage.stage}" for i, stage in enumerate(plan)]


def planned_steps(recipe: Recipe, stage: Stage | None, n_examples: int, processes: int = 1) -> int:
    """Optimizer steps of a stage, computed as Trainer does: its own max_steps, else its own epochs, else the
    train section's max_steps, else the train section's epochs (data parallel: each of ``processes`` takes
    every processes-th batch of an epoch, accelerate's sharding)."""
    train = recipe.train
    if stage is not None and stage.max_steps:
        return stage.max_steps
    if (stage is None or stage.epochs is None) and train.max_steps:
        return train.max_steps
    epochs = stage.epochs if stage is not None and stage.epochs is not None else train.epochs
    batches = math.ceil(math.ceil(n_examples / train.batch_size) / processes)
    per_epoch = max(math.ceil(batches / train.gradient_accumulation), 1)
    return math.ceil(epochs * per_epoch)


def training_arguments(
    recipe: Recipe, stage: Stage | None, root: Path, device: str, n_examples: int
) -> TrainingArguments:
    from transformers import TrainingArguments

    train = recipe.train
    steps = planned_steps(recipe, stage, n_examples, distributed.world_size())
    return TrainingArguments(
        output_dir=str(root),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation,
        learning_rate=stage.lr if stage is not None else train.lr,
        max_steps=steps,
        lr_scheduler_type=train.schedule,
        warmup_steps=train.warmup_ratio if train.warmup_ratio < 1 else 0,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        seed=train.seed,
        data_seed=train.seed,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.checkpoint_steps,
        save_total_limit=None,  # QmoeTrainer rotates its own (complete) checkpoints
        report_to=train.trackers or "none",
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        disable_tqdm=False,  # qmoe.callbacks.ProgressBar draws the bar (Trainer's own printers are removed)
        # data parallel (ignored in one process): every adapter parameter takes part in every step, so DDP
        # need not search the graph for unused ones
        ddp_find_unused_parameters=False,
    )


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",)}
TENSORBOARD_DIR = "tensorboard"


def check_training_options(recipe: Recipe, device: str) -> None:
    """UsageError naming the field for options this machine cannot run: a paged optimizer without CUDA, a
    tracker whose package is missing (found before the model loads, not at the first step)."""
    import importlib.util

    optim = recipe.train.optim
    if optim in PAGED_OPTIMIZERS and device != "cuda":
        raise UsageError(
            f"train.optim={optim} pages optimizer state between GPU and CPU memory and needs CUDA (device is "
            f"{device}); use adamw_bnb_8bit (8-bit state, runs on CPU too) or adamw_torch"
        )
    for name in recipe.train.trackers:
        if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
            hint = "pip install 'qmoe[track]'" if name == "tensorboard" else f"pip install {name}"
            raise UsageError(f"train.report_to={name} needs the {name} package: {hint} (or drop it from report_to)")
    if recipe.eval.enabled and recipe.eval.scorer == "math-verify" and not importlib.util.find_spec("math_verify"):
        raise UsageError("eval.scorer=math-verify needs the math-verify package: pip install 'qmoe[math]'")


def point_trackers_at_run(trainer: object, run_dir: Path, stage_name: str | None, index: int, stages: int) -> None:
    """TensorBoard event files go to RUN/tensorboard/ (one subfolder per LoRACoE stage), not into Trainer's
    default under the checkpoints folder."""
    from transformers.integrations import TensorBoardCallback

    folder = run_dir / TENSORBOARD_DIR
    if stages > 1:
        folder = folder / f"{index + 1}-{stage_name}"
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is None:
            callback.logging_dir = str(folder)


def _read_stage_done(root: Path) -> dict | None:
    path = root / STAGE_DONE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # torn write cannot happen (atomic), but a damaged file only means "redo the stage"


def find_resume_point(roots: list[Path]) -> tuple[int, int, Path | None, Path | None]:
    """(stage index to run next, global step offset, checkpoint to resume inside that stage or None,
    checkpoint of the last finished stage or None)."""
    from .checkpoints import complete_checkpoints

    offset, finished = 0, None
    for index, root in enumerate(roots):
        done = _read_stage_done(root)
        if done and (root / done["checkpoint"]).is_dir():
            offset += int(done["steps"])
            finished = root / done["checkpoint"]
            continue
        found = complete_checkpoints(root)
        return index, offset, (found[-1] if found else None), finished
    return len(roots), offset, None, finished


def save_final_adapter(model: nn.Module, run_dir: Path) -> Path:
    """adapter/ replaced as a whole: written to a staging folder, then renamed."""
    from .modelcard import write_run_model_card
    from .serialization import save_adapter

    final = run_dir / ADAPTER
    staging = run_dir / f"{STAGING_PREFIX}{ADAPTER}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_adapter(model, staging)
        write_run_model_card(run_dir, staging)  # the card names the recipe and the run's figures
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def last_good_checkpoint(run_dir: Path) -> Path | None:
    from .checkpoints import CHECKPOINT_PREFIX, complete_checkpoints

    roots = [run_dir / CHECKPOINTS] + sorted(
        p for p in (run_dir / CHECKPOINTS).glob("*-*") if p.is_dir() and not p.name.startswith((".", CHECKPOINT_PREFIX))
    )
    found = [c for root in roots for c in complete_checkpoints(root)]
    return max(found, key=lambda p: (p.stat().st_mtime, p.name)) if found else None


def remove_stale_staging(run_dir: Path) -> None:
    """Staging folders of a process killed while saving: never complete, safe to delete under the run lock."""
    for path in [
        *run_dir.glob(f"{STAGING_PREFIX}*"),
        *run_dir.glob(f"{REPLACED_PREFIX}*"),
        *(run_dir / CHECKPOINTS).rglob(f"{STAGING_PREFIX}*"),
        *(run_dir / CHECKPOINTS).rglob(f"{REPLACED_PREFIX}*"),
    ]:
        shutil.rmtree(path, ignore_errors=True)


def _describe_failure(exc: BaseException, run_dir: Path) -> str | None:
    """One line for the failures users can fix; None for bugs (they keep their traceback)."""
    last = last_good_checkpoint(run_dir)
    kept = f"; the last good checkpoint is {last}" if last else ""
    if isinstance(exc, torch.OutOfMemoryError):
        return f"out of GPU memory: {OOM_ADVICE}{kept}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"disk full while writing{where}: free space, then continue with qmoe finetune {run_dir} --resume{kept}"
    return None


def run_finetune(
    recipe: Recipe, run_dir: Path, *, resume: bool = False, overwrite: bool = False, run_eval: bool = True
) -> int:
    """Train the recipe into ``run_dir``; 0 on success, 128+signal when stopped by SIGINT/SIGTERM.

    Launched as several processes (``accelerate launch`` / ``torchrun``: data parallel), every process trains
    and only the main one writes the run directory (see ``qmoe.distributed``)."""
    if distributed.launched():
        from .models import pick_device

        distributed.init(pick_device(recipe.model.device))
    try:
        return _run_finetune(recipe, Path(run_dir), resume=resume, overwrite=overwrite, run_eval=run_eval)
    finally:
        distributed.shutdown()


def _run_finetune(recipe: Recipe, run_dir: Path, *, resume: bool, overwrite: bool, run_eval: bool) -> int:
    main, parallel = distributed.is_main(), distributed.world_size() > 1
    with contextlib.ExitStack() as held:

        def take_run_dir() -> None:  # the main process only; the others learn of a refusal and exit
            run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunLock(run_dir))
            prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)

        distributed.on_main(take_run_dir)
        recipe = recipe.model_copy(update={"output_dir": str(run_dir)})
        if main:
            atomic_write_text(run_dir / RECIPE, dump_recipe(recipe))
        # the other processes log warnings and errors only, to stderr: one train.log, one line per step
        handlers = setup_logging(run_dir / LOG) if main else setup_logging(None, logging.WARNING)
        status = StatusFile(run_dir, recipe.adapter.method, write=main)
        status.update()
        from .callbacks import StopRequest, install_signal_handlers, restore_signal_handlers
        from .trainer import NonFiniteLoss

        stop = StopRequest()
        # data parallel: a Ctrl-C reaches every process and the launcher then sends SIGTERM too; that second
        # signal must not cut the checkpoint short (the launcher SIGKILLs its workers after 30 s anyway)
        previous = install_signal_handlers(stop, second_stops_now=not parallel)
        try:
            code = _train_and_evaluate(recipe, run_dir, status, stop, resume=resume, run_eval=run_eval)
            return code
        except UsageError as exc:
            message = str(exc)
            if isinstance(exc, NonFiniteLoss):
                last = last_good_checkpoint(run_dir)
                message += f" (last good checkpoint: {last})" if last else " (no checkpoint was saved before)"
                exc = NonFiniteLoss(message)
            status.update(state="failed", error=message)
            log.error("%s", message)
            raise exc from None
        except BaseException as exc:
            if isinstance(exc, SystemExit):  # another process failed first and reported it (qmoe.distributed)
                raise
            distributed.end_if_launcher_lost()  # a peer's death after a kill -9 of the launcher: not a failure
            message = _describe_failure(exc, run_dir)
            if message is not None:
                status.update(state="failed", error=message)
                log.error("%s", message)
                raise UsageError(message) from None
            if isinstance(exc, KeyboardInterrupt):
                status.update(state="stopped", error="interrupted")
            else:
                status.update(
                    state="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                )
                log.exception("training failed")
            raise
        finally:
            restore_signal_handlers(previous)
            for h in handlers:
                log.removeHandler(h)
                h.close()


def _train_and_evaluate(
    recipe: Recipe, run_dir: Path, status: StatusFile, stop: StopRequest, *, resume: bool, run_eval: bool
) -> int:
    from transformers import set_seed

    from . import adapter_parameters, attach, set_stage
    from .attach import cast_adapter
    from .callbacks import MetricsCallback, ProgressBar
    from .checkpoints import checkpoint_dir, load_checkpoint, read_marker, verify_checkpoint
    from .data import PadCollator
    from .dataprep import load_data_tokenizer, prepare_training_data, require_trainable
    from .hf_private import mark_adapters_attached
    from .models import load_base_model
    from .plan.run import log_planned_vs_measured, plan_run
    from .trainer import QmoeTrainer

    log.info("run directory: %s", run_dir)
    from .models import pick_device

    check_training_options(recipe, pick_device(recipe.model.device))
    # the data first (tokenizer only): bad data fail in seconds, not after loading the model; --resume reuses
    # the cached tokenisation
    prepared = prepare_training_data(recipe.data, load_data_tokenizer(recipe))
    for line in prepared.report.lines():
        log.info("data: %s", line)
    if prepared.report.truncated or prepared.report.dropped:
        log.warning(
            "data: %d examples truncated inside an answer, %d dropped (see above)",
            prepared.report.truncated,
            sum(prepared.report.dropped.values()),
        )
    require_trainable(prepared.report)
    train_set = prepared.dataset
    # the memory plan before any weight is loaded: plan.json, and a warning if it will not fit the GPU
    memory_plan = plan_run(recipe, run_dir) if distributed.is_main() else None  # no collective: main only
    set_seed(recipe.train.seed)  # before attach: adapter init is part of the reproducible run
    model, tokenizer, device = load_base_model(
        recipe.model.source,
        recipe.model.quantization,
        recipe.model.compute_dtype,
        recipe.model.device,
        attn_implementation=recipe.model.attn_implementation,
    )
    config = AdapterConfig(**recipe.adapter.to_dict())  # a private copy: set_stage mutates its config
    plan = recipe.stage_plan()
    if plan[0] is not None:
        config = AdapterConfig(**{**config.to_dict(), "stage": plan[0].stage})
    attach(model, config)
    if recipe.train.adapter_dtype != "compute":  # master weights in fp32 by default, as PEFT keeps them
        cast_adapter(model, getattr(torch, recipe.train.adapter_dtype))
    if recipe.model.gradient_checkpointing:
        # non-reentrant: the adapters' auxiliary losses are computed inside the checkpointed blocks
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    mark_adapters_attached(model)  # else Trainer refuses a "purely quantized" model
    log.info(
        "model %s (%s, %s) on %s; %s adapter with %d parameters in %s; optimizer %s",
        recipe.model.source,
        recipe.model.quantization,
        next(model.parameters()).dtype,
        device,
        config.method,
        adapter_parameters(model),
        str(next(p for p in model.parameters() if p.requires_grad).dtype).removeprefix("torch."),
        recipe.train.optim,
    )

    log.info("training examples: %d", len(train_set))

    roots = stage_roots(run_dir / CHECKPOINTS, plan)
    estimates = [planned_steps(recipe, s, len(train_set), distributed.world_size()) for s in plan]
    status.update(
        trainable_parameters=adapter_parameters(model),
        max_steps=sum(estimates),
        stage=plan[0].stage if plan[0] is not None else None,
    )
    main = distributed.is_main()
    metrics = MetricsLog(run_dir, write=main)

    def resume_point() -> tuple[int, int, Path | None, Path | None]:  # the main process's, handed to all
        start, offset, resume_checkpoint, finished = 0, 0, None, None
        if resume:
            remove_stale_staging(run_dir)
            start, offset, resume_checkpoint, finished = find_resume_point(roots)
            resumed_step = offset
            if resume_checkpoint is not None:
                verify_checkpoint(resume_checkpoint)
                resumed_step += read_marker(resume_checkpoint)["step"]
                log.info("resuming from %s (step %d)", resume_checkpoint, resumed_step)
            elif start == 0:
                log.info("no complete checkpoint found in %s: starting from step 0", run_dir / CHECKPOINTS)
            metrics.truncate_after(resumed_step)
        elif metrics.path.exists():
            metrics.path.unlink()
        return start, offset, resume_checkpoint, finished

    start, offset, resume_checkpoint, finished = distributed.on_main(resume_point)

    for index in range(start, len(plan)):
        stage = plan[index]
        if stop.agree():
            break
        if stage is not None:
            set_stage(model, stage.stage)
        if resume_checkpoint is None and finished is not None:  # a new stage continues from the previous one
            load_checkpoint(model, finished)
        stage_name = stage.stage if stage is not None else config.stage if config.method == "loracoe" else None
        steps_after = sum(estimates[index + 1 :])
        callback = MetricsCallback(metrics, status, stop, device, total_steps_after=steps_after)
        trainer = QmoeTrainer(
            model=model,
            args=training_arguments(recipe, stage, roots[index], device, len(train_set)),
            train_dataset=train_set,
            data_collator=PadCollator(tokenizer.pad_token_id),
            callbacks=[callback, ProgressBar(offset, steps_after, stage_name)],
            stage=stage_name,
            step_offset=offset,
            keep_checkpoints=recipe.train.keep_checkpoints,
        )
        callback.trainer = trainer
        point_trackers_at_run(trainer, run_dir, stage_name, index, len(plan))
        if stage is not None:
            log.info("stage %d/%d: %s, lr %g, %d steps", index + 1, len(plan), stage.stage, stage.lr, estimates[index])
        trainer.train(resume_from_checkpoint=str(resume_checkpoint) if resume_checkpoint else None)
        if stop.agree():
            break
        steps = trainer.state.global_step
        finished = checkpoint_dir(roots[index], steps)
        distributed.on_main(atomic_write_json, roots[index] / STAGE_DONE, {"steps": steps, "checkpoint": finished.name})
        offset += steps
        resume_checkpoint = None

    if stop.agree():
        message = f"stopped by {stop.signal_name}; continue with: qmoe finetune {run_dir} --resume"
        status.update(state="stopped", error=message)
        log.warning("%s", message)
        return 128 + stop.signum

    if start == len(plan) and finished is not None:  # resumed after training had finished (e.g. during eval)
        from .serialization import load_adapter

        load_adapter(model, finished)
    adapter_dir = distributed.on_main(save_final_adapter, model, run_dir)
    log.info("adapter saved: %s", adapter_dir)
    if main:
        log_planned_vs_measured(memory_plan, device)
    if not main:  # evaluation (generation) runs on the main process alone
        return 0
    from .kernels import backends_used

    kernel_backend = backends_used().get(config.method, "torch")  # what the training steps ran; lora: torch
    log.info("kernel backend of %s: %s", config.method, kernel_backend)
    status.update(step=offset, kernel_backend=kernel_backend)

    if run_eval and recipe.eval.enabled:
        from .evaluation import EvaluationStopped, run_evaluation

        task = recipe.eval.task or recipe.data.eval_task
        try:
            result = run_evaluation(
                model,
                tokenizer,
                task=task,
                path=recipe.eval.path,
                limit=recipe.eval.limit,
                batch_size=recipe.eval.batch_size,
                max_new_tokens=recipe.eval.max_new_tokens,
                system_prompt=recipe.data.system_prompt,
                data_section=recipe.data,
                out_file=run_dir / EVAL,
                extra={"model": recipe.model.source, "adapter": str(adapter_dir)},
                should_stop=lambda: stop.signal_name is not None,
                scorer=recipe.eval.scorer,
            )
        except EvaluationStopped:
            message = (
                f"stopped by {stop.signal_name} during evaluation; the adapter is saved in {adapter_dir}; "
                f"evaluate it with: qmoe eval {run_dir}"
            )
            status.update(state="stopped", error=message)
            log.warning("%s", message)
            return 128 + stop.signum
        from .modelcard import write_run_model_card

        write_run_model_card(run_dir, adapter_dir, eval_result=result)  # the card gains the accuracy
    status.update(state="finished", step=offset, error=None)
    log.info("finished: %s", run_dir)
    return 0
