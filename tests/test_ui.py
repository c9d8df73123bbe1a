"""The web UI served on 127.0.0.1 and driven through its API with gradio_client: form validation (the
CLI's rules), path safety, launching real subprocesses into separate run directories, failure reporting,
stop, and the Monitor/Compare views of contract run directories. The full browser flow (train, monitor,
chat on a tiny model) is in test_ui_browser.py."""

from __future__ import annotations

import os
import re
import signal
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from qmoe import rundir  # noqa: E402
from qmoe.recipe import RecipeError, apply_overrides, read_recipe_file, validate_recipe  # noqa: E402
from qmoe_app.main import build_app  # noqa: E402
from qmoe_app.paths import UnsafePathError, resolve_model_source, safe_child  # noqa: E402
from qmoe_app.recipe_form import FIELD_KEYS, recipe_form_values  # noqa: E402
from qmoe_app.runs import RunManager  # noqa: E402
from qmoe_app.testing import serving, write_contract_run  # noqa: E402


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The app serving a runs folder with three contract runs, and a client for its API."""
    root = tmp_path_factory.mktemp("ui")
    runs, models = root / "runs", root / "models"
    models.mkdir()
    write_contract_run(runs, "moe-run", "moelora", accuracy=0.3, trainable=1000)
    write_contract_run(runs, "coe-run", "loracoe", experts=8, accuracy=0.2, trainable=800)
    write_contract_run(runs, "broken-run", "moelora", state="failed", accuracy=None)
    demo = build_app(runs, models)
    with serving(demo) as url:
        yield Client(url, verbose=False), demo.qmoe_context


def form_args(**changes):
    """Positional inputs of the preview/launch endpoints: recipe name, then the form in FIELD_KEYS order."""
    _, values = recipe_form_values("quickstart")
    values.update(changes)
    return ["quickstart"] + [values[k] for k in FIELD_KEYS]


def test_form_shows_the_recipe_and_its_resolved_yaml(ui):
    client, _ = ui
    message, yaml_text = client.predict(*form_args(**{"train.max_steps": 7}), api_name="/preview")
    assert message.startswith("**OK:**")
    recipe = validate_recipe(__import__("yaml").safe_load(yaml_text))
    assert recipe.train.max_steps == 7 and recipe.adapter.method == "moelora"


@pytest.mark.parametrize(
    "changes, cli_override",
    [
        ({"train.lr": -0.001}, "train.lr=-0.001"),
        ({"adapter.top_k": 9}, "adapter.top_k=9"),
        ({"data.max_length": 4}, "data.max_length=4"),
        ({"train.batch_size": 0}, "train.batch_size=0"),
    ],
)
def test_invalid_values_are_refused_with_the_cli_reason(ui, changes, cli_override):
    client, _ = ui
    message, _ = client.predict(*form_args(**changes), api_name="/preview")
    raw = read_recipe_file(Path("recipes/quickstart.yaml"))
    with pytest.raises(RecipeError) as cli_error:
        validate_recipe(apply_overrides(raw, [cli_override]))
    assert message.startswith("**Refused:**")
    assert str(cli_error.value) in message  # the same one-line reason as `qmoe finetune ... KEY=VALUE`


@pytest.mark.parametrize("source", ["/etc", "../../etc", "~/secrets", "models/../../x", "a/b/c"])
def test_model_sources_outside_the_models_folder_are_refused(ui, source):
    client, ctx = ui
    before = set(ctx.runs.list_runs())
    message, _, _, _ = client.predict(*form_args(**{"model.source": source}), api_name="/launch")
    assert message.startswith("**Refused:**") and "model source" in message
    assert set(ctx.runs.list_runs()) == before  # nothing was created


def test_names_from_the_browser_cannot_leave_their_folders(tmp_path):
    (tmp_path / "runs").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "runs" / "link").symlink_to(outside)
    for name in ("..", "../outside", "/etc", "link", ".hidden", "a/b", ""):
        with pytest.raises(UnsafePathError):
            safe_child(tmp_path / "runs", name)
    manager = RunManager(tmp_path / "runs")
    with pytest.raises(UnsafePathError):
        manager.run_dir("link")
    assert resolve_model_source("builtin:smollm2-135m-instruct", tmp_path) == "builtin:smollm2-135m-instruct"
    assert resolve_model_source("Qwen/Qwen2.5-1.5B-Instruct", tmp_path) == "Qwen/Qwen2.5-1.5B-Instruct"
    (tmp_path / "mine").mkdir()
    assert resolve_model_source("mine", tmp_path) == str((tmp_path / "mine").resolve())


@pytest.mark.parametrize("api_name", ["/stop", "/monitor"])
def test_unknown_run_names_are_refused_by_the_endpoints(ui, api_name):
    """Gradio refuses a value that is not one of the listed runs before our code runs; RunManager's own
    check (test above) is the second line."""
    client, _ = ui
    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict("../../etc", api_name=api_name)


@pytest.mark.slow
def test_two_simultaneous_launches_get_separate_directories_and_failures_show_their_error(ui, monkeypatch):
    """A model the offline machine cannot load: both runs get their own folders; one starts as a real
    `qmoe finetune` process, the other waits for the device (one training per device) and starts when the
    first has failed; both fail, and the runs table shows the pipeline's error line (the UI keeps serving)."""
    client, ctx = ui
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # inherited by the launched processes: offline on any machine
    args = form_args(**{"model.source": "nobody/no-such-model", "train.max_steps": 1})
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: client.predict(*args, api_name="/launch"), range(2)))
    names = [re.search(r"(?:launched|queued) \*\*(.+?)\*\*", r[0]).group(1) for r in results]
    assert sorted(r[0].split("**")[2].strip() for r in results) == ["launched", "queued"], results
    assert len(set(names)) == 2
    for name in names:
        run_dir = ctx.runs.run_dir(name)
        recipe = read_recipe_file(run_dir / rundir.RECIPE)
        assert recipe["output_dir"] == str(run_dir) and recipe["model"]["source"] == "nobody/no-such-model"
    deadline = time.time() + 120
    while time.time() < deadline:
        table = client.predict(None, api_name="/runs")[0]
        rows = {row[0]: row for row in table["data"]}
        if all(rows[n][1] == "failed" for n in names):
            break
        time.sleep(1)
    for name in names:
        assert rows[name][1] == "failed"
        assert "nobody/no-such-model" in rows[name][5]  # the pipeline's one-line reason


FAKE_TRAINER = textwrap.dedent("""\
    #!{python}
    # stands in for `python -m qmoe finetune RUN` (the UI's command with this file as the interpreter):
    # behaves as told by the run folder's name
    import json, os, subprocess, sys, time
    if sys.argv[1:-1] != ["-m", "qmoe", "finetune"]:
        sys.exit(f"not launched as `python -m qmoe finetune RUN`: {{sys.argv}}")
    run = sys.argv[-1]
    if run.rstrip("/").split("/")[-1].startswith("crash"):
        print("loading model ...", flush=True)
        print("RuntimeError: CUDA error: device-side assert triggered", file=sys.stderr, flush=True)
        sys.exit(1)
    child = subprocess.Popen(["sleep", "120"])  # a grandchild: Stop must reach the whole group
    open(os.path.join(run, "child.pid"), "w").write(str(child.pid))
    json.dump({{"state": "running", "pid": os.getpid(), "step": 1, "max_steps": 10, "method": "moelora"}},
              open(os.path.join(run, "{status}"), "w"))
    time.sleep(120)
    """)


@pytest.fixture
def fake_runs(tmp_path):
    script = tmp_path / "fake-python"
    script.write_text(FAKE_TRAINER.format(python=sys.executable, status=rundir.STATUS))
    script.chmod(0o755)
    return RunManager(tmp_path / "runs", python=str(script))


def _wait(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_process_that_dies_without_status_shows_as_failed_with_its_last_error(fake_runs):
    run_dir = fake_runs.new_run_dir("crash")
    name = fake_runs.launch_in(run_dir, "adapter: {method: lora}\n")
    assert _wait(lambda: fake_runs.status(name)["state"] == "failed")
    assert fake_runs.status(name)["error"] == "RuntimeError: CUDA error: device-side assert triggered"
    # a fresh UI (no child handle; the process was reaped) reaches the same verdict from the files alone
    assert RunManager(fake_runs.runs_dir).status(name)["state"] == "failed"


def test_stop_terminates_the_whole_process_group(fake_runs):
    run_dir = fake_runs.new_run_dir("long")
    name = fake_runs.launch_in(run_dir, "adapter: {method: lora}\n")
    assert _wait(lambda: (run_dir / "child.pid").exists() and fake_runs.status(name)["state"] == "running")
    grandchild = int((run_dir / "child.pid").read_text())
    assert "stop requested" in fake_runs.stop(name)
    assert _wait(lambda: fake_runs.status(name)["state"] == "failed")  # died without writing "stopped"
    assert _wait(
        lambda: (
            not Path(f"/proc/{grandchild}").exists()
            or Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        )
    )
    assert "not running" in fake_runs.stop(name)


def test_training_survives_the_ui(fake_runs):
    """The run lives in its own session: ending the UI's manager (the browser or the server going away)
    leaves it running, and a new UI still sees it as running and can stop it."""
    run_dir = fake_runs.new_run_dir("long")
    name = fake_runs.launch_in(run_dir, "adapter: {method: lora}\n")
    assert _wait(lambda: fake_runs.status(name)["state"] == "running")
    pid = fake_runs.status(name)["pid"]
    assert os.getpgid(pid) == pid != os.getpgid(0)
    fresh = RunManager(fake_runs.runs_dir)
    assert fresh.status(name)["state"] == "running"
    fresh.stop(name)
    assert _wait(lambda: fake_runs.status(name)["state"] in ("failed", "stopped"))
    os.killpg(pid, signal.SIGKILL) if fake_runs.status(name)["state"] == "running" else None


def test_monitor_reads_the_run_directory(ui):
    client, _ = ui
    status, curves, step, heatmap, imbalance, table = client.predict("moe-run", api_name="/monitor")
    assert "state **finished**" in status and "1,000 trainable parameters" in status and "30.0%" in status
    assert curves and heatmap and imbalance  # rendered figures
    assert step["value"] == step["maximum"] == 9 and "step 20" in step["label"]  # ten points, latest shown
    flags = {row[0]: row[4] for row in table["data"]}
    assert flags["L1 self_attn.v_proj"] == "collapsed experts" and flags["L0 self_attn.q_proj"] == "imbalanced"
    failed = client.predict("broken-run", api_name="/monitor")[0]
    assert "state **failed**" in failed and "RuntimeError: boom" in failed


def test_step_slider_replays_earlier_loads(ui):
    client, _ = ui
    step, heatmap, _, table, follow = client.predict("moe-run", 0, api_name="/replay")
    assert step["value"] == 0 and "step 2" in step["label"] and follow is False and heatmap
    assert all(row[4] == "ok" for row in table["data"])  # the first logged load is nearly uniform


def test_compare_puts_runs_side_by_side(ui):
    client, _ = ui
    curves, table = client.predict(["moe-run", "coe-run"], api_name="/compare")
    rows = {row[0]: row for row in table["data"]}
    assert curves
    assert rows["moe-run"][1] == "moelora" and rows["moe-run"][5] == "30.0%" and rows["moe-run"][7] == "1,000"
    assert rows["coe-run"][1] == "loracoe" and rows["coe-run"][5] == "20.0%" and rows["coe-run"][8] == "1010"


def test_qmoe_ui_help_lists_its_options():
    from qmoe.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["ui"]
    text = sub.format_help()
    assert "--host" in text and "--port" in text and "--runs-dir" in text and "127.0.0.1" in text


def test_chat_routing_view_is_the_routing_of_each_token_during_generation(tmp_path):
    """The Chat tab's per-token routing (collected from the generation's traces: prompt pass, then one
    cached pass per generated token) equals the routing a single full-sequence forward gives every token
    of prompt + reply: each row is that token's own route, aligned with its text."""
    import torch
    from pipeline_support import build_tiny_chat_model

    import qmoe
    from qmoe.chat import ChatModel, stream_reply
    from qmoe.models import load_tokenizer
    from qmoe.testing import load_model
    from qmoe_app.chat_tab import LoadedModel, collect_routing, highlighted_tokens, prompt_token_ids

    folder = build_tiny_chat_model(tmp_path / "tiny-chat")
    model = load_model(folder)
    torch.manual_seed(0)
    qmoe.attach(
        model, qmoe.AdapterConfig(method="moelora", r=2, num_experts=4, top_k=2, target_modules=["q_proj", "down_proj"])
    )
    model.eval()
    model.config.use_cache = True
    tokenizer = load_tokenizer(str(folder))
    routed = [name for name, layer in qmoe.adapter_layers(model).items() if layer.routed]
    chat = ChatModel(model, tokenizer, str(folder), tmp_path, routed)  # what qmoe.chat.load_chat_model builds
    loaded = LoadedModel("test", chat, "moelora")
    messages = [{"role": "user", "content": "Tom has 3 apples and buys 5 more."}]
    prompt = prompt_token_ids(chat, messages)
    done = [e for e in stream_reply(chat, messages, max_new_tokens=6, trace=True) if e.get("done")][0]
    routing = collect_routing(loaded, prompt, done["tokens"])

    n_tokens = len(prompt) + len(done["tokens"])
    assert len(routing.tokens) == n_tokens and len(routing.layers) == 4  # 2 layers x (q_proj, down_proj)
    with torch.no_grad():  # greedy decoding is deterministic: the same ids stream_reply produced
        full_ids = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert full_ids.shape[1] == n_tokens
    assert [tokenizer.decode([int(i)]) for i in full_ids[0, len(prompt) :]] == done["tokens"]
    with torch.no_grad(), qmoe.trace_routing(model):
        model(input_ids=full_ids, use_cache=False)
        reference = {name: info["trace"][0] for name, info in qmoe.routing(model).items()}
    for layer in routing.layers:
        rows = routing.weights[layer]
        assert not np_isnan_any(rows[:-1]) and np_isnan_all(rows[-1])  # the final token never went through
        torch.testing.assert_close(torch.from_numpy(rows[:-1]), reference[layer][:-1], atol=1e-4, rtol=1e-4)
    pairs, colors = highlighted_tokens(routing, routing.layers[0])
    assert [p[0] for p in pairs] == routing.tokens and pairs[-1][1] is None
    assert {p[1] for p in pairs[:-1]} <= set(colors) and len(colors) == 4


def np_isnan_any(a) -> bool:
    import numpy as np

    return bool(np.isnan(a).any())


def np_isnan_all(a) -> bool:
    import numpy as np

    return bool(np.isnan(a).all())


@pytest.mark.slow
def test_stop_from_the_ui_makes_the_real_pipeline_checkpoint_and_report_stopped(tmp_path, monkeypatch):
    """Stop on a real `qmoe finetune` launched like the Train tab does: the pipeline gets SIGTERM, saves
    a checkpoint, and the UI shows the run as stopped with the pipeline's resume hint."""
    import yaml
    from pipeline_support import arithmetic_items, build_tiny_chat_model, tiny_recipe, write_jsonl

    model_dir = build_tiny_chat_model(tmp_path / "tiny-chat")
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", arithmetic_items(64))
    write_jsonl(data / "test.jsonl", arithmetic_items(4, start=500))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    runs = RunManager(tmp_path / "runs")
    run_dir = runs.new_run_dir("tiny")
    recipe = tiny_recipe(
        model_dir, data, run_dir, train={"max_steps": 5000, "logging_steps": 1, "checkpoint_steps": 4000}
    )
    name = runs.launch_in(run_dir, yaml.safe_dump(recipe, sort_keys=False))
    assert _wait(lambda: (runs.status(name).get("step") or 0) >= 2, timeout=120), runs.log_tail(name)
    assert "process group" in runs.stop(name)
    assert runs.status(name)["state"] in ("stopping", "stopped")
    assert _wait(lambda: runs.status(name)["state"] == "stopped", timeout=120), runs.log_tail(name)
    assert "--resume" in runs.status(name)["error"]
    assert any((run_dir / rundir.CHECKPOINTS).iterdir())
    runs._children[name].wait(timeout=120)  # it exits just after writing "stopped": leave no process behind
