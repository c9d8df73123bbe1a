"""Checkpoint folders: save, verify, list, prune and load.

A checkpoint ``checkpoint-N/`` holds the adapter (``qmoe.save_adapter``), the MoELoRA contrastive queues
(``queues.safetensors``), Trainer's optimizer, scheduler, RNG and trainer state, and last the marker
``qmoe_checkpoint.json``. Everything is written into a staging folder, fsynced, and renamed into place, so a
checkpoints folder only ever holds complete checkpoints; the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from . import distributed
from .attach import adapter_layers
from .errors import UsageError
from .hf_private import RNG_STATE_FILE, RNG_STATE_PER_PROCESS, TRAINER_STATE_FILE, TRAINING_STATE_FILES
from .io import atomic_write_bytes, atomic_write_json, fsync_dir, replace_dir
from .rundir import STAGING_PREFIX
from .serialization import WEIGHTS_FILE, AdapterError, load_adapter, read_adapter_config
from .tuners.moelora.layer import QueueFormatError

QUEUES_FILE = "queues.safetensors"
MARKER_FILE = "qmoe_checkpoint.json"  # written last: its presence means the checkpoint is complete
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(UsageError):
    """A checkpoint that cannot be loaded; the message names the file."""


def checkpoint_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of (stage-local) optimizer step ``step`` lives under ``root``."""
    return root / f"{CHECKPOINT_PREFIX}{step}"


# ------------------------------------------------------------------------------------------- queues


def save_queues(model: nn.Module, directory: Path) -> None:
    """MoELoRA contrastive queues (rank vectors of recent anchors and their expert ids) of every layer."""
    tensors = {}
    for name, layer in adapter_layers(model).items():
        if hasattr(layer, "queue_state"):
            tensors.update({f"{name}.{key}": t.contiguous() for key, t in layer.queue_state().items()})
    atomic_write_bytes(directory / QUEUES_FILE, save(tensors))


def load_queues(model: nn.Module, directory: Path) -> None:
    path = directory / QUEUES_FILE
    if not path.is_file():
        return
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise CheckpointError(f"{path} is corrupt or truncated ({exc})") from None
    for name, layer in adapter_layers(model).items():
        prefix = f"{name}."
        state = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
        if state and hasattr(layer, "load_queue_state"):
            try:
                layer.load_queue_state(state)
            except QueueFormatError as exc:
                raise CheckpointError(
                    f"{path} {exc} (layer {name}); delete this file to resume with empty queues "
                    "(they refill within a few steps)"
                ) from None


# ------------------------------------------------------------------------------------------- save


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def write_checkpoint(
    root: Path,
    step: int,
    marker: dict,
    write: Callable[[Path], None],
    write_each: Callable[[Path], None] | None = None,
) -> Path:
    """``checkpoint-<step>/`` under ``root``: ``write_each(staging)`` then ``write(staging)`` fill a staging
    folder, the marker is added last, everything is fsynced and the folder renamed into place (replacing an
    older copy of that step). Data parallel: every process calls ``write_each`` (its share, e.g. its RNG
    state) into the one staging folder the main process made; only the main process does the rest, and every
    process returns once the checkpoint is complete."""
    final = checkpoint_dir(root, step)
    staging = distributed.on_main(_new_staging, root, final)
    try:
        if write_each is not None:
            distributed.everywhere(write_each, staging)
        distributed.on_main(_complete, staging, final, marker, write)
    except BaseException:
        if distributed.is_main():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _new_staging(root: Path, final: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{STAGING_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _complete(staging: Path, final: Path, marker: dict, write: Callable[[Path], None]) -> None:
    write(staging)
    atomic_write_json(staging / MARKER_FILE, {**marker, "complete": True})
    _fsync_tree(staging)
    replace_dir(staging, final)  # re-saving a step after a resume replaces the old copy


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints under ``root``."""
    for stale in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------------------------- list, verify, load


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


def read_marker(path: Path) -> dict:
    """The marker of a complete checkpoint: ``step`` (within its stage), ``global_step``, ``stage``."""
    return json.loads((path / MARKER_FILE).read_text())


def _training_state_globals() -> list:
    """The non-tensor types Trainer's state files hold: numpy's RNG state (an ndarray of uint32) inside
    ``rng_state*.pth``; the optimizer, scheduler and scaler states are tensors, numbers and containers."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 renamed it
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# torch's weights-only unpickler names the global a pickle asked for ("unsupported GLOBAL posix.system ...",
# "Unsupported global: GLOBAL x.y was not an allowed global ..."); other failures mean damaged bytes
_UNSAFE_GLOBAL = re.compile(r"unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", re.IGNORECASE)


def load_training_state(file: Path):
    """One of Trainer's pickled state files, loaded with ``weights_only=True`` (tensors, numbers,
    containers and the numpy RNG types only): a file whose pickle would import or call anything else -- a
    tampered or foreign checkpoint -- is refused with CheckpointError naming it, and nothing in it runs."""
    try:
        with torch.serialization.safe_globals(_training_state_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSAFE_GLOBAL.search(str(exc))
        if found is None:
            reason = next(
                (line for line in str(exc).splitlines() if line.startswith("Unsupported")), "unpickling failed"
            )
            raise CheckpointError(f"{file} is corrupt or truncated ({reason})") from None
        raise CheckpointError(
            f"{file} refused: it would load {found.group(1)}, which a training state never holds, so the file may "
            "have been tampered with; nothing in it was run. Resume only from checkpoints you trust, or delete "
            "this checkpoint folder"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises several types for damaged files
        raise CheckpointError(f"{file} is corrupt or truncated ({str(exc).splitlines()[0]})") from None


def verify_checkpoint(path: Path) -> None:
    """Open every file of a checkpoint; CheckpointError naming the first damaged one."""
    try:
        read_adapter_config(path)
        load_file(str(path / WEIGHTS_FILE))
    except AdapterError as exc:
        raise CheckpointError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path / WEIGHTS_FILE} is corrupt or truncated ({exc})") from None
    for file in training_state_files(path):
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: incomplete checkpoint")
        load_training_state(file)
    try:
        json.loads((path / TRAINER_STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / TRAINER_STATE_FILE} is missing or corrupt ({exc})") from None


def training_state_files(path: Path) -> list[Path]:
    """The Trainer state files a complete checkpoint holds: optimizer, scheduler and RNG state, the latter
    as rng_state.pth (one process) or rng_state_<rank>.pth (one per process, data parallel). A run resumed
    with another process count still resumes; processes without their own RNG file start a fresh stream."""
    per_process = sorted(path.glob(RNG_STATE_PER_PROCESS.format("*")))
    names = [n for n in TRAINING_STATE_FILES if not (per_process and n == RNG_STATE_FILE)]
    return [path / n for n in names] + per_process


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """The adapter weights and MoELoRA queues of a checkpoint into ``model`` (Trainer restores the rest)."""
    try:
        load_adapter(model, path)
    except AdapterError as exc:
        raise CheckpointError(str(exc)) from None
    load_queues(model, path)
