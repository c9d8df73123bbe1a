"""Issue 6: interrupted runs resume exactly, checkpoints never corrupt, failures explain themselves."""

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from pipeline_support import build_tiny_chat_model, qmoe_cli, qmoe_popen, tiny_recipe, write_recipe
from safetensors.torch import load_file

import qmoe
from qmoe.checkpoints import complete_checkpoints, verify_checkpoint
from qmoe.errors import UsageError
from qmoe.io import read_jsonl
from qmoe.pipeline import run_finetune
from qmoe.recipe import validate_recipe
from qmoe.rundir import MetricsLog


@pytest.fixture
def make_recipe(chat_model_dir, data_dir, tmp_path):
    def make(run="run", method="moelora", **sections):
        sections.setdefault("eval", {"enabled": False})
        return tiny_recipe(chat_model_dir, data_dir, tmp_path / run, method=method, **sections)

    return make


def wait_for(predicate, timeout=240.0, interval=0.02, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process is not None and process.poll() is not None:
            return predicate()
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(make_recipe, tmp_path):
    # 12 steps over 8 batches per epoch: the resume crosses an epoch boundary; dropout exercises the RNG state,
    # MoELoRA's contrastive queues carry state between steps
    train = {"max_steps": 12, "checkpoint_steps": 4, "logging_steps": 1, "lr": 5e-3}
    reference = validate_recipe(make_recipe(run="reference", train=train))
    assert run_finetune(reference, Path(reference.output_dir)) == 0

    recipe_file = write_recipe(tmp_path / "killed.yaml", make_recipe(run="killed", train=train))
    run_dir = tmp_path / "killed"
    process = qmoe_popen("finetune", recipe_file)
    try:
        wait_for(lambda: bool(complete_checkpoints(run_dir / "checkpoints")), process=process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)  # reaps it and closes its pipes (an unclosed pipe is a ResourceWarning)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "running", "the run finished before it could be killed"
    assert not (run_dir / "adapter").exists()

    done = qmoe_cli("finetune", run_dir, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr

    expected, actual = adapter_tensors(Path(reference.output_dir) / "adapter"), adapter_tensors(run_dir / "adapter")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    queues_ref = load_file(str(Path(reference.output_dir) / "checkpoints" / "checkpoint-12" / "queues.safetensors"))
    queues = load_file(str(run_dir / "checkpoints" / "checkpoint-12" / "queues.safetensors"))
    assert queues_ref and queues.keys() == queues_ref.keys()
    for key in queues_ref:
        torch.testing.assert_close(queues[key], queues_ref[key], rtol=1e-5, atol=1e-6, msg=key)

    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 13)), "no duplicate or missing steps after the resume"
    ref_loss = [r["loss"] for r in read_jsonl(Path(reference.output_dir) / "metrics.jsonl")]
    got_loss = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert got_loss == pytest.approx(ref_loss, rel=1e-5)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert not list(run_dir.rglob(".staging-*"))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_nonzero_then_resumes(make_recipe, tmp_path):
    train = {"max_steps": 16, "checkpoint_steps": 100, "logging_steps": 1}
    recipe_file = write_recipe(tmp_path / "r.yaml", make_recipe(train=train))
    run_dir = tmp_path / "run"
    process = qmoe_popen("finetune", recipe_file)
    try:
        wait_for(lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= 2, process=process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and "SIGTERM" in status["error"]
    saved = complete_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in saved] == [f"checkpoint-{status['step']}"]
    assert 2 <= status["step"] < 16
    verify_checkpoint(saved[0])

    done = qmoe_cli("finetune", run_dir, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 17))


@pytest.mark.slow
def test_huge_lr_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(make_recipe, tmp_path):
    train = {"lr": 1e6, "max_grad_norm": 0.0, "max_steps": 10, "checkpoint_steps": 2, "warmup_ratio": 0.0}
    recipe_file = write_recipe(tmp_path / "r.yaml", make_recipe(train=train, model={"gradient_checkpointing": False}))
    done = qmoe_cli("finetune", recipe_file)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert "loss became nan at step" in message or "became NaN/inf at step" in message
    assert "train.lr=0.0002" in message and "last good checkpoint" in message
    run_dir = tmp_path / "run"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "at step" in status["error"]
    kept = complete_checkpoints(run_dir / "checkpoints")
    assert kept, "a checkpoint from before the divergence is kept"
    verify_checkpoint(kept[-1])
    assert all(torch.isfinite(t).all() for t in adapter_tensors(kept[-1]).values())
    assert not (run_dir / "adapter").exists()


@pytest.mark.slow
def test_truncated_adapter_names_the_file(make_recipe, chat_model_dir):
    recipe = validate_recipe(make_recipe(train={"max_steps": 1}))
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    weights = run_dir / "adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    with pytest.raises(qmoe.AdapterError, match=r"adapter\.safetensors is corrupt or truncated"):
        qmoe.load_adapter(qmoe.testing.load_model(chat_model_dir), run_dir / "adapter")
    done = qmoe_cli("eval", run_dir, "--limit", "1")
    assert done.returncode == 2
    assert str(weights) in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["optimizer.pt", "adapter.safetensors", "queues.safetensors"])
def test_damaged_checkpoint_on_resume_names_the_file(make_recipe, tmp_path, damaged):
    recipe = validate_recipe(make_recipe(train={"max_steps": 4, "checkpoint_steps": 2}))
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    last = complete_checkpoints(run_dir / "checkpoints")[-1]
    (last / "../stage_done.json").resolve().unlink()  # pretend training had not finished
    target = last / damaged
    target.write_bytes(target.read_bytes()[:40])
    done = qmoe_cli("finetune", run_dir, "--resume")
    assert done.returncode == 2
    assert str(target) in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_last_good_one(make_recipe, monkeypatch):
    recipe = validate_recipe(make_recipe(train={"max_steps": 6, "checkpoint_steps": 2}))
    run_dir = Path(recipe.output_dir)
    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # checkpoint-2 writes optimizer, scheduler, rng; checkpoint-4 hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(UsageError, match=r"disk full while writing .*optimizer\.pt.*--resume.*checkpoint-2"):
        run_finetune(recipe, run_dir)
    monkeypatch.setattr(torch, "save", real_save)

    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["checkpoint-2"]
    verify_checkpoint(run_dir / "checkpoints" / "checkpoint-2")
    assert not list((run_dir / "checkpoints").glob(".staging-*"))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "disk full" in status["error"]

    assert run_finetune(recipe, run_dir, resume=True) == 0
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 7))


def test_out_of_memory_gives_advice(make_recipe, monkeypatch):
    from qmoe.trainer import QmoeTrainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(QmoeTrainer, "compute_loss", out_of_memory)
    recipe = validate_recipe(make_recipe(train={"max_steps": 2}))
    with pytest.raises(
        UsageError, match=r"out of GPU memory: lower train.batch_size.*data.max_length.*gradient_checkpointing"
    ):
        run_finetune(recipe, Path(recipe.output_dir))
    assert json.loads((Path(recipe.output_dir) / "status.json").read_text())["state"] == "failed"


@pytest.mark.slow
def test_adapter_for_another_base_names_the_layer_and_shape(make_recipe, tmp_path):
    recipe = validate_recipe(make_recipe(train={"max_steps": 1}))
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    narrower = build_tiny_chat_model(tmp_path / "narrow", hidden=32)
    done = qmoe_cli("eval", run_dir / "adapter", "--base", narrower, "--limit", "1")
    assert done.returncode == 2
    assert "layer model.layers.0." in done.stderr and "has shape" in done.stderr and "in the model" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_concurrent_runs_write_separate_directories_and_never_share_one(make_recipe, tmp_path):
    from qmoe.rundir import RunLock

    train = {"max_steps": 6, "checkpoint_steps": 3}
    first = write_recipe(tmp_path / "a.yaml", make_recipe(run="a", train=train))
    second = write_recipe(tmp_path / "b.yaml", make_recipe(run="b", train=train))
    run_a, run_b = qmoe_popen("finetune", first), qmoe_popen("finetune", second)
    try:
        outputs = [p.communicate(timeout=300) for p in (run_a, run_b)]
    finally:
        for p in (run_a, run_b):
            if p.poll() is None:
                p.kill()
    assert run_a.returncode == 0 and run_b.returncode == 0, [o[1][-2000:] for o in outputs]
    status_a = json.loads((tmp_path / "a" / "status.json").read_text())
    status_b = json.loads((tmp_path / "b" / "status.json").read_text())
    assert status_a["pid"] == run_a.pid and status_b["pid"] == run_b.pid
    for name in ("a", "b"):
        assert [r["step"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")] == list(range(1, 7))
        assert (tmp_path / name / "adapter" / "adapter.safetensors").is_file()

    # a directory in use by a live run (here: this test holding its lock) is refused, not shared
    busy = tmp_path / "busy"
    busy.mkdir()
    write_recipe(busy / "recipe.yaml", make_recipe(run="busy", train=train))
    with RunLock(busy):
        clash = qmoe_cli("finetune", busy)
    assert clash.returncode == 2 and f"in use by pid {os.getpid()}" in clash.stderr
    assert not (busy / "metrics.jsonl").exists() and not (busy / "status.json").exists()


def test_metrics_log_drops_steps_after_the_checkpoint_and_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3, 4):
        log.append({"step": step, "loss": 1.0})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "lo')  # the writer was killed mid-line
    assert [r["step"] for r in read_jsonl(log.path)] == [1, 2, 3, 4]
    log.truncate_after(2)
    log.append({"step": 3, "loss": 0.5})
    assert [r["step"] for r in read_jsonl(log.path)] == [1, 2, 3]
    assert all(line.endswith("}") for line in log.path.read_text().splitlines())


def test_atomic_json_writes_never_leave_a_partial_file(tmp_path, monkeypatch):
    from qmoe.io import atomic_write_json

    target = tmp_path / "status.json"
    atomic_write_json(target, {"state": "running"})

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        atomic_write_json(target, {"state": "finished"})
    assert json.loads(target.read_text()) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_stops_with_the_adapter_saved(make_recipe, monkeypatch):
    import qmoe.evaluation

    real_generate = qmoe.evaluation.generate

    def generate_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by run_finetune's handler
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(qmoe.evaluation, "generate", generate_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    recipe = validate_recipe(
        make_recipe(train={"max_steps": 2}, eval={"enabled": True, "limit": 4, "batch_size": 2, "max_new_tokens": 4})
    )
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 128 + signal.SIGTERM
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and "during evaluation" in status["error"]
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()
    assert not (run_dir / "eval.json").exists()
    assert signal.getsignal(signal.SIGTERM) == handler_before  # qmoe's handler is removed again
