"""qmoe bench (issue 5): it runs end to end on a tiny plan and writes the documented JSON. No timing
assertions: timings on a shared CI machine are not a test."""

import json

import pytest
import torch

from qmoe.bench import BenchPlan, LayerCase, StepCase, backbones, run_bench
from qmoe.bench.report import markdown
from qmoe.cli import main

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    tie_word_embeddings=True,
)
RECORD_KEYS = {
    "level",
    "method",
    "baseline",
    "backend",
    "device",
    "dtype",
    "shapes",
    "repeats",
    "time_s",
    "baseline_time_s",
    "ratio_time",
    "ratio_cpu_time",
    "peak_mem",
    "baseline_peak_mem",
    "ratio_peak_mem",
    "trainable_params",
    "baseline_trainable_params",
}


@pytest.fixture
def tiny_backbone(monkeypatch):
    monkeypatch.setitem(backbones.RANDOM_SHAPES, "tiny", TINY_SHAPE)
    return "tiny"


def tiny_plan(backbone, memory, step_methods=("loracoe",)):
    return BenchPlan(
        "cpu",
        [LayerCase(backbone, "up_proj", 64, 128, 16)],
        ["moelora", "loracoe", "loramoe", "lora"],
        [StepCase(backbone, 1, 8)],
        list(step_methods),
        layer_repeats=1,
        step_repeats=1,
        warmup=0,
        memory=memory,
        name="test",
    )


@pytest.mark.slow
def test_bench_runs_and_records_every_comparison(tiny_backbone):
    messages = []
    result = run_bench(tiny_plan(tiny_backbone, memory=True), progress=messages.append)
    records = result["records"]
    assert messages, "progress is reported"
    for record in records:
        assert RECORD_KEYS <= set(record), RECORD_KEYS - set(record)
        assert record["device"] == "cpu" and record["ratio_time"] > 0
    layer = [r for r in records if r["level"] == "layer" and r["baseline"] == "peft-lora"]
    assert {r["method"] for r in layer} == {"moelora", "loracoe", "loramoe", "lora"}
    for r in layer:  # PEFT LoRA at (nearly) the same trainable-parameter count
        assert abs(r["trainable_params"] - r["baseline_trainable_params"]) <= 192 / 2 + 1
    assert {r["method"] for r in records if r["level"] == "adapter"} == {"moelora", "loracoe", "loramoe", "lora"}
    assert all(r["baseline"] == "per-expert-loop" for r in records if r["level"] == "adapter")
    steps = [r for r in records if r["level"] == "step"]
    assert {r["method"] for r in steps} == {"loracoe"}
    for r in steps:  # the peak memory comes from a child process per configuration
        assert r["peak_mem"] > 0 and r["baseline_peak_mem"] > 0 and r["ratio_peak_mem"] > 0
        assert r["shapes"]["hidden"] == 64 and r["shapes"]["layers"] == 2
    assert result["meta"]["cpu_cores"] >= 1 and result["meta"]["date"]
    assert "| where |" in markdown(result)


def test_bench_command_writes_json(tiny_backbone, monkeypatch, tmp_path, capsys):
    import qmoe.bench as bench

    monkeypatch.setattr(bench, "plan_for", lambda device, quick=False: tiny_plan(tiny_backbone, memory=True))
    out, tables = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["bench", "--quick", "--device", "cpu", "--no-memory", "--json", str(out), "--methods", "moelora", "lora"]
    assert main([*argv, "--markdown", str(tables)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["command"].startswith("qmoe bench --quick")
    # the recorded command is the one given, every option included (it used to drop --markdown)
    assert data["meta"]["command"] == " ".join(["qmoe", *argv, "--markdown", str(tables)])
    assert "| where |" in tables.read_text()
    assert {r["method"] for r in data["records"]} == {"moelora", "lora"}
    assert all(r["peak_mem"] is None for r in data["records"])
    assert "qmoe bench" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_bench_cuda_without_gpu_is_a_usage_error(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_unknown_method_is_a_usage_error(capsys):
    assert main(["bench", "--device", "cpu", "--methods", "moe"]) == 2
    assert "unknown method" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# weight bytes a decode step reads (qmoe.bench.traffic: benchmarks/decode_cost.py's bytes bound)


def test_decode_traffic_counts_the_frozen_weights_once_and_the_adapters_rows_read(tiny_4bit):
    import qmoe
    from qmoe.bench.traffic import adapter_bytes, frozen_bytes, memory_bound_ratio

    dense = tiny_4bit("none")
    # unquantised fp32: every parameter once, but an untied input embedding (a token reads one row of it)
    unique = {p.data_ptr(): p.numel() * 4 for p in dense.parameters()}
    embedding, head = dense.get_input_embeddings().weight, dense.get_output_embeddings().weight
    untied = embedding.numel() * 4 if embedding.data_ptr() != head.data_ptr() else 0
    assert untied and frozen_bytes(dense) == sum(unique.values()) - untied
    four_bit = tiny_4bit()
    linear = [m for m in four_bit.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.in_features * m.out_features for m in linear)
    # the 4-bit layers: half a byte per weight plus their statistics; the rest as stored
    saved = weights * 4 - weights // 2
    assert saved > frozen_bytes(dense) - frozen_bytes(four_bit) > saved - weights // 8

    for method, settings in [("lora", dict(r=5)), ("moelora", dict(top_k=2)), ("moelora", dict(top_k=8))]:
        model = qmoe.attach(tiny_4bit(), qmoe.AdapterConfig(method=method, dropout=0.0, **settings))
        assert frozen_bytes(model) == frozen_bytes(four_bit)  # the adapter's parameters are not frozen weights
        layers = qmoe.adapter_layers(model).values()
        c = next(iter(layers)).config
        widths = sum(layer.in_features + layer.out_features for layer in layers)
        if method == "lora":
            assert adapter_bytes(model) == 4 * c.r * widths
        else:  # the router's rows and the k chosen experts' rows of A and B
            routers = sum(c.num_experts * layer.in_features for layer in layers)
            assert adapter_bytes(model) == 4 * (routers + c.top_k * c.r * widths)
    assert memory_bound_ratio(300, 100) == 0.75
