"""``qmoe plan`` against the real thing on CPU: planned peak vs the measured peak tensor memory of a training
step, per model x method x gradient checkpointing x batch/length.

Measured: one real training step (forward with loss and auxiliary losses, backward, gradient clipping,
AdamW step, zero_grad) of the real 4-bit model (bitsandbytes NF4, double quantization, fp32 compute, as
``qmoe finetune`` loads it on CPU), after warm-up steps (optimizer state created; MoELoRA queues filled).
Peak = bytes of the tensors alive before the step (unique storages of parameters, buffers, bitsandbytes
quantization state, optimizer state, contrastive queues) + the largest net allocation during the step,
from ``torch.profiler`` with ``profile_memory=True`` (its "[memory]" events carry the CPU allocator's running
total of bytes allocated while profiling).

Models: the builtin SmolLM2-135M and a random-weight Llama-3.2-1B-shaped model with 2 decoder layers
(``benchmarks/configs/llama-3.2-1b``, published shapes). Prints a Markdown table; ``--json`` writes rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import qmoe
from qmoe.models import bnb_config, builtin_model_dir
from qmoe.plan.activations import training_forward
from qmoe.plan.report import cached_planner
from qmoe.recipe import validate_recipe

CONFIGS = Path(__file__).parent / "configs"
METHODS = ("lora", "loramoe", "moelora", "loracoe")
MODELS = {  # name: (settings as (batch, length), decoder layers of the random-weight copy or None = as is)
    "smollm2-135m": (((1, 128), (2, 256)), None),
    "llama-3.2-1b": (((1, 64), (2, 128)), 2),
}


def model_folder(name: str, layers: int | None, scratch: Path) -> Path:
    if name == "smollm2-135m":
        return builtin_model_dir("builtin:smollm2-135m-instruct")
    from transformers import AutoConfig, AutoModelForCausalLM

    target = scratch / f"{name}-{layers}l"
    if not (target / "config.json").is_file():
        config = AutoConfig.from_pretrained(CONFIGS / name)
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # random weights
        model.save_pretrained(target)
    return target


def live_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Unique storages alive between steps: weights (with bitsandbytes' quantization state), adapter,
    optimizer state, contrastive queues."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:
            for value in (state.absmax, state.code, getattr(state, "offset", None)):
                add(value)
            state = getattr(state, "state2", None)
    for state in optimizer.state.values():
        for value in state.values():
            add(value)
    for layer in qmoe.adapter_layers(model).values():
        for value in (getattr(layer, "queue", None), getattr(layer, "queue_labels", None)):
            add(value)
        for value in getattr(layer, "_queue_used", None) or ():
            add(value)
    return sum(seen.values())


def step(model, optimizer, inputs) -> None:
    loss = training_forward(model, inputs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def load(folder: Path) -> torch.nn.Module:
    """The 4-bit backbone as ``qmoe.models.load_base_model`` loads it on CPU (loaded once per model: every row
    attaches to it and detaches again)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=bnb_config("nf4", torch.float32), dtype=torch.float32
    )
    model.config.use_cache = False
    return model


def measure(model, method: str, checkpointing: bool, batch: int, length: int) -> dict:
    torch.manual_seed(0)
    qmoe.attach(model, qmoe.AdapterConfig(method=method, stage="joint" if method == "loracoe" else None))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        return _measure_step(model, method, batch, length)
    finally:
        if checkpointing:
            model.activation_checkpointing_disable()
        qmoe.detach(model)


def _measure_step(model, method: str, batch: int, length: int) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[-1, length // 2 :] = 0  # a padded batch, as PadCollator makes
    labels = ids.masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():  # B at zero gives the experts no outputs to contrast, nor queues to fill
        for layer in qmoe.adapter_layers(model).values():
            layer.lora_B.normal_(0, 0.02)
    for _ in range(3 if method == "moelora" else 1):  # queues near full; the planner counts them full
        step(model, optimizer, inputs)
    before = live_bytes(model, optimizer)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, optimizer, inputs)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return {"measured": before + max(totals, default=0), "before_step": before, "step_wall_s": wall, "step_cpu_s": cpu}


def planned(folder: Path, method: str, checkpointing: bool, batch: int, length: int) -> tuple[int, float]:
    recipe = validate_recipe(
        {
            "model": {
                "source": str(folder),
                "device": "cpu",
                "compute_dtype": "float32",
                "gradient_checkpointing": checkpointing,
            },
            "adapter": {"method": method},
            "train": {"batch_size": batch},
            "data": {"max_length": length},
        }
    )
    start = time.perf_counter()
    peak = cached_planner(recipe).plan().peak_bytes
    return peak, time.perf_counter() - start


def print_row(row: dict) -> None:
    layers = f" ({row['layers']} layers)" if row["layers"] else ""
    print(
        f"| {row['model']}{layers} | {row['method']} | {'on' if row['checkpointing'] else 'off'} | "
        f"{row['batch']}x{row['length']} | {row['planned'] / 2**20:.1f} MiB | {row['measured'] / 2**20:.1f} MiB | "
        f"{row['planned'] / row['measured']:.3f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS, reverse=True))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "qmoe-plan-accuracy"))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument(
        "--replan",
        metavar="ROWS.json",
        nargs="+",
        help="re-plan rows measured before (files written by --json) with this checkout's planner; measures nothing",
    )
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    scratch = Path(args.scratch)
    rows = []
    print("| model | method | checkpointing | batch x length | planned | measured | planned / measured |")
    print("|---|---|---|---|---:|---:|---:|")
    if args.replan:
        for file in args.replan:
            for row in json.loads(Path(file).read_text()):
                folder = model_folder(row["model"], row["layers"], scratch)
                row["planned"], row["plan_s"] = planned(
                    folder, row["method"], row["checkpointing"], row["batch"], row["length"]
                )
                rows.append(row)
                print_row(row)
        args.models = []
    for name in args.models:
        settings, layers = MODELS[name]
        folder = model_folder(name, layers, scratch)
        model = load(folder)
        for method in args.methods:
            for checkpointing in (False, True):
                for batch, length in settings:
                    real = measure(model, method, checkpointing, batch, length)
                    plan, plan_s = planned(folder, method, checkpointing, batch, length)
                    row = {
                        "model": name,
                        "layers": layers,
                        "method": method,
                        "checkpointing": checkpointing,
                        "batch": batch,
                        "length": length,
                        "planned": plan,
                        "plan_s": plan_s,
                        **real,
                    }
                    rows.append(row)
                    print_row(row)
    worst = max(rows, key=lambda r: abs(r["planned"] / r["measured"] - 1))
    print(f"\nworst row: {worst['planned'] / worst['measured'] - 1:+.1%} ({worst['model']}, {worst['method']})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
