"""The run directory: the documented files a fine-tune writes and the UI reads (see README "Run directory").

``recipe.yaml`` (resolved recipe), ``status.json`` (state of the run, rewritten atomically), ``metrics.jsonl``
(one JSON object per logging step, appended line by line), ``train.log``, ``checkpoints/``, ``adapter/``
(final adapter) and ``eval.json`` (``eval-base.json``, ``eval-<task>.json``: see :func:`eval_file_name`).
Every module names these files through the constants below. What is inside a ``checkpoint-N/`` folder is
``qmoe.checkpoints``' business.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UsageError
from .io import atomic_write_json, atomic_write_text, fsync_dir, read_jsonl

RECIPE = "recipe.yaml"
STATUS = "status.json"
METRICS = "metrics.jsonl"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
EVAL = "eval.json"
PLAN = "plan.json"  # qmoe plan's memory estimate, written before the model is loaded
LOCK = ".lock"
RESULTS = (METRICS, CHECKPOINTS, ADAPTER, EVAL)  # anything here means the directory holds a run's results
STAGE_DONE = "stage_done.json"  # in checkpoints/<i>-<stage>/: that stage finished, and its last checkpoint
# folders being written (renamed into place when complete) and folders being replaced (qmoe.io.replace_dir);
# left behind only by a killed process, deleted on --resume
STAGING_PREFIX = ".staging-"
REPLACED_PREFIX = ".old-"


def eval_file_name(task: str | None = None, *, base: bool = False) -> str:
    """``eval.json`` for the run's own eval task, ``eval-<task>.json`` for another test set (``task`` is its
    short name, e.g. SVAMP or boolq), with ``-base`` before ``.json`` for the base model alone."""
    stem = Path(EVAL).stem if task is None else f"{Path(EVAL).stem}-{task}"
    return f"{stem}-base.json" if base else f"{stem}.json"


def now() -> str:
    return dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds")


def has_results(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RESULTS)


def clear_results(run_dir: Path) -> None:
    """--overwrite: remove a previous run's outputs, keeping nothing but the directory."""
    for name in RESULTS + (STATUS, LOG):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class RunLock:
    """An exclusive lock on a run directory, so two processes never train into the same one.

    filelock takes the OS lock (flock on POSIX, msvcrt on Windows), released by the OS if the process dies; the
    holder writes its pid into the lock file so a refused process can say who holds it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.lock = FileLock(self.path, timeout=0)

    def __enter__(self) -> RunLock:
        try:
            self.lock.acquire()
        except Timeout:
            try:
                holder = f"pid {int(self.path.read_text().strip())}"
            except (OSError, ValueError):
                holder = "another process"
            raise UsageError(
                f"run directory {self.path.parent} is in use by {holder}; use another output_dir"
            ) from None
        try:
            self.path.write_text(str(os.getpid()))
        except OSError:
            pass  # Windows refuses a second handle on a locked region: the message then says "another process"
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


class StatusFile:
    """``status.json``: state running|finished|failed|stopped, pid, started, updated, step, max_steps,
    stage, error, trainable_parameters, method, kernel_backend. Every update rewrites it atomically;
    ``write=False`` (the non-main processes of a data-parallel run) keeps the data and writes nothing."""

    def __init__(self, run_dir: Path, method: str, max_steps: int | None = None, *, write: bool = True):
        self.path = run_dir / STATUS
        self.write = write
        self.data = {
            "state": "running",
            "pid": os.getpid(),
            "started": now(),
            "updated": now(),
            "step": 0,
            "max_steps": max_steps,
            "stage": None,
            "error": None,
            "trainable_parameters": 0,
            "method": method,
        }

    def update(self, **fields: object) -> None:
        self.data.update(fields)
        self.data["updated"] = now()
        if self.write:
            atomic_write_json(self.path, self.data)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logging step, appended and fsynced line by line (``write=False``:
    appends nothing, for the non-main processes of a data-parallel run)."""

    def __init__(self, run_dir: Path, *, write: bool = True):
        self.path = run_dir / METRICS
        self.write = write

    def truncate_after(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint, so steps are never duplicated."""
        records = read_jsonl(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records) or self._has_torn_tail():
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def _has_torn_tail(self) -> bool:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def append(self, record: dict) -> None:
        if not self.write:
            return
        line = json.dumps(record) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create the directory; refuse to touch a previous run's results unless --resume or --overwrite."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_results(run_dir)
        fsync_dir(run_dir)
    elif has_results(run_dir) and not resume:
        raise UsageError(
            f"run directory {run_dir} already holds results; continue it with --resume or start again with --overwrite"
        )
