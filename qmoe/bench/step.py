"""Step level: one full training step (forward with labels, auxiliary losses, backward, AdamW update) of a
4-bit backbone with gradient checkpointing (non-reentrant), each qmoe method vs PEFT LoRA at the same
trainable-parameter count.

Time: every configuration is a clone of one loaded backbone sharing its frozen weights, stepped in turn
(interleaved, repeated, medians) in this process. Peak memory: each configuration runs alone in a child
process (``python -m qmoe.bench.step``) that loads the pickled backbone, takes a warm-up step, resets the
peak and takes two more; CUDA reports max_memory_allocated, CPU the peak resident set size (VmHWM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import attach, aux_loss, clear_aux
from ..attach import cast_adapter
from .adapters import PEFT, adapted_width, attach_peft, matching_rank, method_config, trainable
from .backbones import load_backbone, share_frozen_clone
from .timing import interleaved_medians, peak_memory, reset_peak_memory


def enable_checkpointing(model: nn.Module) -> None:
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def build(backbone: nn.Module, spec: dict) -> tuple[nn.Module, bool]:
    """(model, is_qmoe) for a spec {"method": name} or {"method": "peft-lora", "rank": r, "dropout": p}."""
    enable_checkpointing(backbone)
    if spec["method"] == PEFT:
        return attach_peft(backbone, spec["rank"], spec["dropout"]), False
    # fp32 adapter weights, as PEFT keeps its LoRA (and as qmoe trains by default): like with like on bf16 GPUs
    return cast_adapter(attach(backbone, method_config(spec["method"])), torch.float32), True


def make_step(model: nn.Module, is_qmoe: bool, batch: dict) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        out = model(**batch)
        loss = out.loss + aux_loss(model) if is_qmoe else out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if is_qmoe:
            clear_aux(model)

    return step


def make_batch(vocab: int, batch: int, seq: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def step_specs(backbone: nn.Module, methods: list[str]) -> list[tuple[dict, dict]]:
    """The qmoe specs and, per method, PEFT LoRA at its trainable-parameter count (rank rounded)."""
    width = adapted_width(backbone)
    specs = []
    for method in methods:
        config = method_config(method)
        probe = attach(share_frozen_clone(backbone), config)
        count = trainable(probe)
        del probe
        specs.append(
            ({"method": method}, {"method": PEFT, "rank": matching_rank(count, width), "dropout": config.dropout})
        )
    return specs


def bench_steps(
    name: str,
    methods: list[str],
    device: str,
    batch: int,
    seq: int,
    repeats: int,
    warmup: int,
    layers: int | None = None,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    say = progress or (lambda msg: None)
    say(f"step {name}: loading the 4-bit backbone" + (f" ({layers} layers)" if layers else ""))
    backbone = load_backbone(name, device, layers=layers)
    data = make_batch(backbone.config.vocab_size, batch, seq, device)
    pairs = step_specs(backbone, methods)
    specs = {}
    for ours, theirs in pairs:
        specs[ours["method"]] = ours
        specs[f"{PEFT}-r{theirs['rank']}"] = theirs
    steps, counts = {}, {}
    for key, spec in specs.items():
        model, is_qmoe = build(share_frozen_clone(backbone), spec)
        counts[key] = trainable(model)
        steps[key] = make_step(model, is_qmoe, data)
    rounds = iter(range(1, warmup + repeats + 1))
    say(f"step {name}: timing {len(steps)} configurations x {repeats} (interleaved, after {warmup} warm-up)")
    medians = interleaved_medians(
        steps, repeats, warmup, device, on_round=lambda: say(f"step {name}: round {next(rounds)}/{warmup + repeats}")
    )
    del steps
    peaks = {}
    if memory:
        with tempfile.TemporaryDirectory(prefix="qmoe-bench-") as tmp:
            path = Path(tmp) / "backbone.pt"
            torch.save(backbone, path)
            for key, spec in specs.items():
                say(f"step {name}: peak memory of {key} (child process)")
                peaks[key] = measure_peak_in_child(path, spec, device, batch, seq)
    cfg = backbone.config
    shapes = {
        "backbone": name,
        "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size,
        "layers": cfg.num_hidden_layers,
        "vocab": cfg.vocab_size,
        "batch": batch,
        "seq": seq,
    }
    records = []
    dtype = str(next(p for p in backbone.parameters() if p.is_floating_point()).dtype).replace("torch.", "")
    from .. import kernels

    backend = kernels.backend_for(data["input_ids"].float())
    for ours, theirs in pairs:
        a, b = ours["method"], f"{PEFT}-r{theirs['rank']}"
        pa, pb = peaks.get(a), peaks.get(b)
        records.append(
            dict(
                level="step",
                device=device,
                dtype=dtype,
                shapes=shapes,
                repeats=repeats,
                method=a,
                backend=backend,
                baseline=PEFT,
                baseline_rank=theirs["rank"],
                time_s=medians[a]["median_s"],
                baseline_time_s=medians[b]["median_s"],
                ratio_time=medians[a]["median_s"] / medians[b]["median_s"],
                ratio_cpu_time=medians[a]["cpu_median_s"] / medians[b]["cpu_median_s"],
                tokens_per_s=batch * seq / medians[a]["median_s"],
                baseline_tokens_per_s=batch * seq / medians[b]["median_s"],
                peak_mem=pa,
                baseline_peak_mem=pb,
                ratio_peak_mem=(pa / pb) if pa and pb else None,
                trainable_params=counts[a],
                baseline_trainable_params=counts[b],
            )
        )
    return records


def measure_peak_in_child(backbone_path: Path, spec: dict, device: str, batch: int, seq: int) -> int | None:
    payload = json.dumps({"backbone": str(backbone_path), "spec": spec, "device": device, "batch": batch, "seq": seq})
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "qmoe.bench.step", payload], capture_output=True, text=True, env=env)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_mem"]
    sys.stderr.write(f"peak-memory child failed for {spec}:\n{done.stderr[-2000:]}\n")
    return None


def _child(payload: str) -> None:
    args = json.loads(payload)
    device = args["device"]
    backbone = torch.load(args["backbone"], weights_only=False, map_location=device)
    model, is_qmoe = build(backbone, args["spec"])
    step = make_step(model, is_qmoe, make_batch(backbone.config.vocab_size, args["batch"], args["seq"], device))
    step()  # warm-up: optimizer state and allocator pools exist from here on, as in a long run
    reset_peak_memory(device)
    for _ in range(2):
        step()
    print(json.dumps({"peak_mem": peak_memory(device)}))


if __name__ == "__main__":
    _child(sys.argv[1])
