"""Helpers for the UI tests: serve the app on a free local port, and write a run directory that follows
the contract (status.json, metrics.jsonl with expert loads, eval.json) without training anything."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qmoe import rundir
from qmoe.io import atomic_write_json, atomic_write_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(demo, host: str = "127.0.0.1", auth=None) -> Iterator[str]:
    """Launch ``demo`` in this process on a free port (with ``auth``, a ``qmoe_app.auth.Accounts``, behind
    the login); yields its URL; closes it afterwards."""
    from .main import launch

    port = free_port()
    launch(demo, host=host, port=port, auth=auth, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://{host}:{port}/"
    finally:
        demo.close()
        context = getattr(demo, "qmoe_context", None)
        if context is not None:
            context.runs.close()  # the run-queue thread, if one is waiting


def write_contract_run(
    runs_dir: Path,
    name: str,
    method: str = "moelora",
    steps: int = 20,
    experts: int = 4,
    layers: int = 2,
    state: str = "finished",
    accuracy: float | None = 0.25,
    trainable: int = 12345,
) -> Path:
    """A run directory as the pipeline writes it, with a plausible loss curve and expert loads that drift
    from uniform towards one busy expert (and one collapsed expert in the last layer)."""
    run = Path(runs_dir) / name
    run.mkdir(parents=True)
    atomic_write_text(run / rundir.RECIPE, f"adapter:\n  method: {method}\noutput_dir: {run}\n")
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "v_proj")]
    lines = []
    for step in range(2, steps + 1, 2):
        t = step / steps
        load = {}
        for j, layer in enumerate(names):
            raw = [
                1.0 + t * (2.0 if e == 0 else 0.0) - (t * 0.99 if (e == experts - 1 and j == len(names) - 1) else 0)
                for e in range(experts)
            ]
            total = sum(raw)
            load[layer] = [v / total for v in raw]
        lm = 2.5 * math.exp(-2 * t) + 0.5
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "epoch": t,
                    "loss": lm + 0.05,
                    "lm_loss": lm,
                    "balance_loss": 1.0 + 0.2 * t if method == "moelora" else 0.0,
                    "contrastive_loss": 3.0 - t if method == "moelora" else 0.0,
                    "lr": 1e-3 * (1 - t),
                    "tokens_per_s": 900 + 10 * step,
                    "peak_mem_mb": 512 + step,
                    "stage": "joint",
                    "expert_load": {} if method == "lora" else load,
                }
            )
        )
    (run / rundir.METRICS).write_text("\n".join(lines) + "\n")
    now = time.time()
    atomic_write_json(
        run / rundir.STATUS,
        {
            "state": state,
            "pid": None,
            "started": now - 60,
            "updated": now,
            "step": steps,
            "max_steps": steps,
            "stage": "joint",
            "error": "RuntimeError: boom" if state == "failed" else None,
            "trainable_parameters": trainable,
            "method": method,
        },
    )
    if accuracy is not None:
        atomic_write_json(run / rundir.EVAL, {"task": "gsm8k", "n": 20, "accuracy": accuracy, "predictions": []})
    return run
