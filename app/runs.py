"""Run directories: create one per launch, start ``qmoe finetune`` in it as a detached subprocess, stop it,
and read its state back (status.json, metrics.jsonl, eval.json) following the run-directory contract.

Training runs in its own session/process group: a crash there never takes the UI down, closing the
browser (or restarting the UI) leaves it running, and Stop sends SIGTERM to the whole group (the pipeline
saves a checkpoint on SIGTERM).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

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

FINAL_STATES = ("finished", "failed", "stopped")


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
        there. Returns the run name."""
        run_dir = self.run_dir(Path(run_dir).name)
        atomic_write_text(run_dir / rundir.RECIPE, recipe_yaml)
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
            {"pid": process.pid, "command": command, "started": time.time(), "launched_by": "qmoe ui"},
        )
        with self._lock:
            self._children[run_dir.name] = process
        return run_dir.name

    def stop(self, name: str) -> str:
        """SIGTERM the run's process group. Returns a one-line message."""
        run_dir = self.run_dir(name)
        info = self.status(name)
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
        status = _read_json(run_dir / rundir.STATUS) or {}
        launch = _read_json(run_dir / LAUNCH_FILE) or {}
        info = dict(status)
        info["name"] = name
        pid = status.get("pid") or launch.get("pid")
        info["pid"] = pid
        state = status.get("state")
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
        sig = []
        for file in (rundir.METRICS, rundir.STATUS, rundir.EVAL):
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
