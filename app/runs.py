"""Run directories: create one per launch, start ``qmoe finetune`` in it as a detached subprocess, stop it,
and read its state back (status.json, metrics.jsonl, eval.json) following the run-directory contract.

Training runs in its own session/process group: a crash there never takes the UI down, closing the
browser (or restarting the UI) leaves it running, and Stop sends SIGTERM to the whole group (the pipeline
saves a checkpoint on SIGTERM).

One training per device: a launch while another run trains on the same device (the recipe's
``model.device``, ``auto`` = cuda when there is one) waits in ``queue.json`` in the runs folder, in order,
and a scheduler thread starts it when the device frees. The queue is a file (written atomically, changed
under a file lock), so it survives a UI restart and two UIs on one runs folder share it; a queued run can be
cancelled.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import yaml
from filelock import FileLock

from qmoe import rundir
from qmoe.cli import qmoe_command
from qmoe.io import atomic_write_json, atomic_write_text, read_jsonl
from qmoe.serialization import CONFIG_FILE as ADAPTER_CONFIG_FILE
from qmoe.sysinfo import pid_alive

from .paths import UnsafePathError, safe_child

# written by the UI next to the pipeline's files: how it started the process, that process's output, and
# that Stop was pressed
LAUNCH_FILE = "launch.json"
CONSOLE_FILE = "console.log"
STOP_REQUEST_FILE = "stop-requested.json"
# in the runs folder: launches waiting for their device, oldest first, and the lock every change takes
QUEUE_FILE = "queue.json"
QUEUE_LOCK_FILE = ".queue.lock"
SCHEDULER_SECONDS = 1.0  # how often a waiting launch checks whether its device is free

FINAL_STATES = ("finished", "failed", "stopped", "cancelled")
ACTIVE_STATES = ("starting", "running", "stopping")  # a run in one of these holds its device

log = logging.getLogger("qmoe.ui")


def state_label(info: dict) -> str:
    """A run's state as the Train and Monitor tabs show it: ``queued (position N)`` while it waits."""
    if info.get("state") == "queued" and info.get("queue_position"):
        return f"queued (position {info['queue_position']})"
    return info.get("state") or "unknown"


def recipe_device(recipe_yaml: str) -> str:
    """The device a recipe trains on, as the pipeline picks it: ``model.device``, where ``auto`` (the
    default) is cuda when a GPU is available, else cpu."""
    try:
        data = yaml.safe_load(recipe_yaml)
    except yaml.YAMLError:
        data = None
    model = data.get("model") if isinstance(data, dict) else None
    device = model.get("device") if isinstance(model, dict) else None
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or caught mid-write by a non-atomic writer
        return None
    return data if isinstance(data, dict) else None


def last_line(path: Path, max_bytes: int = 16384) -> str | None:
    """Last non-empty line of a log (progress-bar carriage returns count as line breaks)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else None


def _last_error_line(run_dir: Path) -> str | None:
    """The line that best explains a failure: the last traceback/error line of the process output if
    there is one, else the last line of train.log or of the output."""
    for name in (CONSOLE_FILE, rundir.LOG):
        try:
            text = (run_dir / name).read_text(encoding="utf-8", errors="replace")[-65536:]
        except OSError:
            continue
        lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
        if errors:
            return errors[-1]
    return last_line(run_dir / CONSOLE_FILE) or last_line(run_dir / rundir.LOG)


class RunManager:
    """All runs under one runs directory."""

    def __init__(self, runs_dir: str | os.PathLike, python: str | None = None):
        """``python``: run the trainer with this interpreter instead of qmoe's own (tests use a fake one)."""
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        # filelock's lock is per thread and per process, so it orders this UI's threads and other UIs alike
        self._queue_lock = FileLock(str(self.runs_dir / QUEUE_LOCK_FILE))
        self._scheduler: threading.Thread | None = None
        self._closed = threading.Event()
        if self.queued():  # launches left waiting by a previous UI
            self._ensure_scheduler()

    # ------------------------------------------------------------------------------------------ paths
    def run_dir(self, name: str) -> Path:
        path = safe_child(self.runs_dir, name)
        if not path.is_dir():
            raise UnsafePathError(f"no run named {name!r} in {self.runs_dir}")
        return path

    def list_runs(self) -> list[str]:
        """Run names, newest first (folders with a recipe.yaml)."""
        runs = [
            p for p in self.runs_dir.iterdir() if p.is_dir() and not p.is_symlink() and (p / rundir.RECIPE).is_file()
        ]
        runs.sort(key=lambda p: (p / rundir.RECIPE).stat().st_mtime, reverse=True)
        return [p.name for p in runs]

    def new_run_dir(self, prefix: str) -> Path:
        """A fresh, uniquely named run folder. ``mkdir`` fails if the name exists, so two launches in the
        same second (or from two UIs) still get separate folders."""
        safe_child(self.runs_dir, prefix)  # validates the prefix
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for _ in range(100):
            path = self.runs_dir / f"{prefix}-{stamp}-{secrets.token_hex(2)}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
        raise RuntimeError("could not create a unique run directory")

    # ------------------------------------------------------------------------------------------ launch/stop
    def finetune_command(self, run_dir: Path) -> list[str]:
        # the contract: `qmoe finetune RUN_DIR` trains the run directory's recipe.yaml into that directory
        command = qmoe_command("finetune", str(run_dir))
        if self.python is not None:
            command[0] = self.python
        return command

    def launch_in(self, run_dir: Path, recipe_yaml: str) -> str:
        """Write ``recipe_yaml`` into ``run_dir`` (fresh, from :meth:`new_run_dir`) and start training
        there, or queue it while another run trains on its device (:meth:`queue_position` tells which).
        Returns the run name."""
        run_dir = self.run_dir(Path(run_dir).name)
        atomic_write_text(run_dir / rundir.RECIPE, recipe_yaml)
        device = recipe_device(recipe_yaml)
        with self._queue_lock:
            queue = self.queued()
            if any(entry["device"] == device for entry in queue) or self.busy_runs(device):
                queue.append({"name": run_dir.name, "device": device, "queued": time.time()})
                atomic_write_json(self.runs_dir / QUEUE_FILE, {"queue": queue})
                queued = True
            else:
                self._start(run_dir, device)
                queued = False
        if queued:
            self._ensure_scheduler()
        return run_dir.name

    def _start(self, run_dir: Path, device: str) -> None:
        command = self.finetune_command(run_dir)
        child_env = dict(os.environ)
        child_env["PYTHONUNBUFFERED"] = "1"
        with open(run_dir / CONSOLE_FILE, "ab") as console:
            process = subprocess.Popen(
                command,
                cwd=run_dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,  # own process group: survives the UI, stopped as a group
            )
        atomic_write_json(
            run_dir / LAUNCH_FILE,
            {
                "pid": process.pid,
                "command": command,
                "started": time.time(),
                "launched_by": "qmoe ui",
                "device": device,
            },
        )
        with self._lock:
            self._children[run_dir.name] = process

    # ------------------------------------------------------------------------------------------ queue
    def queued(self) -> list[dict]:
        """The waiting launches, oldest first: ``{"name", "device", "queued"}`` each."""
        data = _read_json(self.runs_dir / QUEUE_FILE) or {}
        entries = data.get("queue")
        if not isinstance(entries, list):
            return []
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str) and e.get("device")]

    def queue_position(self, name: str) -> int | None:
        """1 for the next run to start on its device, 2 for the one after, ...; None when not queued."""
        queue = self.queued()
        entry = next((e for e in queue if e["name"] == name), None)
        if entry is None:
            return None
        same_device = [e["name"] for e in queue if e["device"] == entry["device"]]
        return same_device.index(name) + 1

    def device_of(self, name: str) -> str:
        """The device a run trains on: as recorded at launch, else from its recipe (a run started from a
        shell into this runs folder)."""
        launch = _read_json(self.run_dir(name) / LAUNCH_FILE) or {}
        if launch.get("device"):
            return str(launch["device"])
        try:
            return recipe_device((self.run_dir(name) / rundir.RECIPE).read_text(encoding="utf-8"))
        except OSError:
            return "unknown"

    def busy_runs(self, device: str) -> list[str]:
        """Runs now training on ``device`` (started by any UI or from a shell)."""
        waiting = {e["name"] for e in self.queued()}
        busy = []
        for name in self.list_runs():
            if name in waiting:
                continue
            try:
                if self.status(name)["state"] in ACTIVE_STATES and self.device_of(name) == device:
                    busy.append(name)
            except (OSError, UnsafePathError):
                continue
        return busy

    def start_waiting(self) -> list[str]:
        """Start the first waiting launch of every device that is free; returns the names started."""
        started = []
        with self._queue_lock:
            queue = self.queued()
            keep, taken = [], set()
            for entry in queue:
                name, device = entry["name"], entry["device"]
                try:
                    run_dir = self.run_dir(name)
                except UnsafePathError:  # its folder was deleted: forget it
                    continue
                if device in taken or self.busy_runs(device):
                    keep.append(entry)
                    taken.add(device)  # keep the order: nothing behind it on that device starts first
                    continue
                self._start(run_dir, device)
                started.append(name)
                taken.add(device)
            if len(keep) != len(queue):
                atomic_write_json(self.runs_dir / QUEUE_FILE, {"queue": keep})
        return started

    def cancel(self, name: str) -> str:
        """Take a waiting launch out of the queue (it never starts). Returns a one-line message."""
        run_dir = self.run_dir(name)
        with self._queue_lock:
            queue = self.queued()
            keep = [e for e in queue if e["name"] != name]
            if len(keep) == len(queue):
                return f"{name} is not queued"
            atomic_write_json(
                run_dir / rundir.STATUS, {"state": "cancelled", "pid": None, "updated": time.time(), "error": None}
            )
            atomic_write_json(self.runs_dir / QUEUE_FILE, {"queue": keep})
        return f"cancelled {name}: it was queued and never started"

    def _ensure_scheduler(self) -> None:
        with self._lock:
            if self._scheduler is None and not self._closed.is_set():
                self._scheduler = threading.Thread(target=self._schedule, name="qmoe-run-queue", daemon=True)
                self._scheduler.start()

    def _schedule(self) -> None:
        """Until the queue is empty (or :meth:`close`): start waiting launches whose device freed."""
        while not self._closed.wait(SCHEDULER_SECONDS):
            try:
                self.start_waiting()
            except Exception:  # noqa: BLE001 - a bad run folder must not stop the queue for the others
                log.exception("run queue: starting a waiting launch failed")
            with self._lock:
                if not self.queued():
                    self._scheduler = None
                    return
        with self._lock:
            self._scheduler = None

    def close(self) -> None:
        """Stop the scheduler thread (the queue file stays: a later RunManager continues it) and reap the
        runs that have exited; the ones still training go on."""
        self._closed.set()
        with self._lock:
            thread = self._scheduler
        if thread is not None:
            thread.join()
        self._reap()

    def _reap(self) -> None:
        """Collect the exit status of our children that ended (else they linger as zombies)."""
        with self._lock:
            for name, child in list(self._children.items()):
                if child.poll() is not None:
                    del self._children[name]

    def stop(self, name: str) -> str:
        """SIGTERM the run's process group. Returns a one-line message."""
        run_dir = self.run_dir(name)
        info = self.status(name)
        if info["state"] == "queued":
            return self.cancel(name)
        if info["state"] not in ("running", "starting"):
            return f"{name} is not running ({info['state']})"
        pid = info.get("pid")
        try:
            pid = int(pid)
            if os.getpgid(pid) == pid:  # launched by the UI: it leads its own group (workers included)
                os.killpg(pid, signal.SIGTERM)
                target = f"process group {pid}"
            else:  # started elsewhere (e.g. `qmoe finetune` in a shell): never signal a group it merely joined
                os.kill(pid, signal.SIGTERM)
                target = f"process {pid}"
        except (ProcessLookupError, TypeError, ValueError):
            return f"{name}: process {pid} is already gone"
        atomic_write_json(run_dir / STOP_REQUEST_FILE, {"time": time.time(), "by": "qmoe ui"})
        return f"stop requested for {name} (SIGTERM to {target}); it saves a checkpoint and exits"

    def _alive(self, name: str, pid: int | None) -> bool:
        with self._lock:
            child = self._children.get(name)
        if child is not None and (pid is None or child.pid == int(pid)):
            return child.poll() is None  # also reaps our own finished children
        return pid_alive(pid)

    # ------------------------------------------------------------------------------------------ reading
    def status(self, name: str) -> dict:
        """status.json, corrected by what is known about the process: a run whose process died without
        writing a final state is ``failed`` with the last error line of its output."""
        run_dir = self.run_dir(name)
        self._reap()
        status = _read_json(run_dir / rundir.STATUS) or {}
        launch = _read_json(run_dir / LAUNCH_FILE) or {}
        info = dict(status)
        info["name"] = name
        pid = status.get("pid") or launch.get("pid")
        info["pid"] = pid
        state = status.get("state")
        if state is None and not launch:
            position = self.queue_position(name)
            if position is not None:
                info.update(state="queued", queue_position=position)
                return info
        if state not in FINAL_STATES:
            alive = self._alive(name, pid)
            if state is None:
                state = "starting" if alive else ("failed" if launch else "unknown")
            elif not alive:
                state = "failed"
            if state == "failed" and not info.get("error"):
                info["error"] = _last_error_line(run_dir) or "the training process exited without a final status"
        if state == "failed" and not info.get("error"):
            info["error"] = _last_error_line(run_dir)
        info["state"] = state
        if (run_dir / STOP_REQUEST_FILE).exists() and state in ("running", "starting"):
            info["state"] = "stopping"
        return info

    def metrics(self, name: str) -> list[dict]:
        try:
            return read_jsonl(self.run_dir(name) / rundir.METRICS)
        except ValueError:  # a corrupt line in the middle: show what precedes it
            return []

    def metrics_signature(self, name: str) -> tuple:
        """Cheap change detector for live refresh (size and mtime of the files the plots read)."""
        run_dir = self.run_dir(name)
        sig = [self.queue_position(name)]
        for file in (rundir.METRICS, rundir.STATUS, rundir.EVAL, LAUNCH_FILE):
            try:
                st = (run_dir / file).stat()
                sig.append((st.st_size, st.st_mtime_ns))
            except OSError:
                sig.append(None)
        return tuple(sig)

    def eval_result(self, name: str) -> dict | None:
        return _read_json(self.run_dir(name) / rundir.EVAL)

    def adapter_dir(self, name: str) -> Path | None:
        """The run's final adapter folder, or None while it has not been saved."""
        path = self.run_dir(name) / rundir.ADAPTER
        return path if (path / ADAPTER_CONFIG_FILE).is_file() else None

    def log_tail(self, name: str, lines: int = 40) -> str:
        run_dir = self.run_dir(name)
        for file in (rundir.LOG, CONSOLE_FILE):
            try:
                text = (run_dir / file).read_text(encoding="utf-8", errors="replace")[-32768:]
            except OSError:
                continue
            if text.strip():
                rows = [r for r in text.replace("\r", "\n").splitlines() if r.strip()]
                return "\n".join(rows[-lines:])
        return ""
