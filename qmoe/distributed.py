"""Data-parallel training (``accelerate launch`` / ``torchrun``): who this process is, and the few collectives
qmoe's mixture state needs beyond DDP's gradient all-reduce.

Every function is a no-op (or the identity) in a single process, so a plain ``qmoe finetune`` runs exactly
the code it ran before data parallelism existed. The launcher sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`init` starts the process group through accelerate (gloo on CPU, NCCL on CUDA), as Trainer would.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when a launcher started this process as one of several (before or after :func:`init`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> None:
    """Start the process group when launched as several processes; accelerate picks the backend (the same
    ``PartialState`` Trainer's arguments create, so Trainer reuses it)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    from accelerate import PartialState

    PartialState(cpu=device == "cpu")
    if device == "cuda":
        torch.cuda.set_device(local_rank())
    watch_parent()


def shutdown() -> None:
    """Destroy the process group (gloo aborts at interpreter exit if it is still alive)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
    return (
        torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else torch.device("cpu")
    )


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over all processes (a new tensor on ``tensor``'s device; the input unchanged)."""
    if world_size() == 1:
        return tensor.clone()
    buffer = tensor.detach().to(_device(), copy=True)
    dist.all_reduce(buffer)
    return buffer.to(tensor.device)


def all_reduce_max(value: int) -> int:
    if world_size() == 1:
        return value
    buffer = torch.tensor([value], dtype=torch.long, device=_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
    return int(buffer.item())


def all_gather_equal(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` (the same shape everywhere), stacked in rank order: [world, *shape]."""
    if world_size() == 1:
        return tensor[None].clone()
    block = tensor.detach().to(_device())
    gathered = [torch.empty_like(block) for _ in range(world_size())]
    dist.all_gather(gathered, block)
    return torch.stack(gathered).to(tensor.device)


def all_gather_rows(rows: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's ``rows`` [n_p, d] (n_p <= max_rows, varying per process) concatenated in rank order,
    and the row counts per process [world]. One all_gather of a padded [max_rows + 1, d] block, whose
    first row carries the count."""
    if world_size() == 1:
        return rows, torch.tensor([rows.shape[0]], device=rows.device)
    # fp32 at least: the count in the first row, and labels packed by callers, stay exact integers
    dtype = torch.promote_types(rows.dtype, torch.float32)
    block = torch.zeros(max_rows + 1, rows.shape[1], dtype=dtype, device=_device())
    block[0, 0] = rows.shape[0]
    block[1 : rows.shape[0] + 1] = rows.detach().to(block.device, dtype)
    gathered = [torch.empty_like(block) for _ in range(world_size())]
    dist.all_gather(gathered, block)
    counts = [int(g[0, 0]) for g in gathered]
    out = torch.cat([g[1 : n + 1] for g, n in zip(gathered, counts, strict=True)])
    return out.to(rows.device, rows.dtype), torch.tensor(counts, device=rows.device)


def broadcast(obj: Any) -> Any:
    """The main process's ``obj`` on every process (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def on_main(fn, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on the main process only and hand its result to every process; when it raises, the main
    process re-raises it and the others exit with status 2 (the main process prints the one-line error), so
    no process is left waiting in a collective."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    result, failure = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            failure = f"{type(exc).__name__}: {exc}"
            broadcast((None, failure))
            raise
    result, failure = broadcast((result, failure))
    if failure is not None:
        raise SystemExit(2)
    return result


def everywhere(fn, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on every process; when it raises on any of them every process stops (the failing ones
    re-raise, the others exit with status 2) instead of waiting in the next collective."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        all_reduce_max(1)
        raise
    if all_reduce_max(0):
        raise SystemExit(2)
    return result


_launcher: dict[str, int] = {}  # "pid": the launcher watch_parent watches


def end_if_launcher_lost() -> None:
    """SIGKILL this worker now if its launcher has died: what :func:`watch_parent` does within its interval.

    Called where a worker is about to record a failure: when the launcher is killed, the worker whose watch
    fires first dies, and the other sees its collective fail before its own watch fires; that error is the
    kill's echo, not a failure of the run (which stays resumable, as after a kill of one process)."""
    parent = _launcher.get("pid")
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def watch_parent(interval: float = 0.5) -> None:
    """End this worker when its launcher dies (``kill -9`` of ``accelerate launch``/``torchrun`` leaves its
    workers orphaned: they would keep training into the run directory while a ``--resume`` is refused by its
    lock). The launcher's SIGTERM is the graceful path; losing the launcher is treated as being killed."""
    _launcher["pid"] = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            end_if_launcher_lost()

    threading.Thread(target=watch, name="qmoe-parent-watch", daemon=True).start()
