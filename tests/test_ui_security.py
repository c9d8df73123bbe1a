"""Issue 19: a UI that is safe to expose and to share. A login on every route once the UI listens beyond
loopback (Gradio's login plus qmoe's gate for the routes Gradio leaves open), one training per device (a
queue in the runs folder that survives a restart and can be cancelled), no code execution from a
checkpoint's pickles, and 8 simultaneous clients all answered with bounded memory."""

from __future__ import annotations

import os
import pickle
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from pipeline_support import qmoe_cli  # noqa: E402

from qmoe import rundir  # noqa: E402
from qmoe.checkpoints import CheckpointError, load_training_state  # noqa: E402
from qmoe.cli import qmoe_command  # noqa: E402
from qmoe.errors import UsageError  # noqa: E402
from qmoe.sysinfo import pid_alive  # noqa: E402
from qmoe_app.auth import Accounts, is_loopback, read_auth_file, resolve_accounts  # noqa: E402
from qmoe_app.chat_tab import ChatModels  # noqa: E402
from qmoe_app.main import build_app  # noqa: E402
from qmoe_app.recipe_form import FIELD_KEYS, recipe_form_values  # noqa: E402
from qmoe_app.runs import QUEUE_FILE, RunManager, state_label  # noqa: E402
from qmoe_app.testing import free_port, serving, write_contract_run  # noqa: E402

# ---------------------------------------------------------------------------------------------- authentication


def test_a_host_beyond_loopback_needs_a_login(tmp_path):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert is_loopback(host)
        accounts, login = resolve_accounts(host, env={})
        assert not accounts and login is None  # loopback: no password by default
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        assert not is_loopback(host)
        with pytest.raises(
            UsageError, match=r"--host .* --auth-file FILE .*QMOE_UI_AUTH=user:password.*--auth-token auto"
        ):
            resolve_accounts(host, env={})
    accounts, _ = resolve_accounts("0.0.0.0", env={"QMOE_UI_AUTH": "alice:s3cr:et"})
    assert accounts("alice", "s3cr:et") and not accounts("alice", "s3cr") and not accounts("bob", "s3cr:et")
    accounts, login = resolve_accounts("0.0.0.0", auth_token="auto", env={})
    token = re.search(r"password (\S+)", login).group(1)
    assert accounts("qmoe", token) and token not in repr(accounts)  # only a hash is kept
    with pytest.raises(UsageError, match="only valid value is 'auto'"):
        resolve_accounts("0.0.0.0", auth_token="hunter2", env={})


def test_auth_files_are_user_password_lines(tmp_path):
    good = tmp_path / "auth"
    good.write_text("# accounts\nalice:one\n\nbob:two:three\n")
    assert read_auth_file(good) == [("alice", "one"), ("bob", "two:three")]
    for text, where in (("alice\n", "line 1"), ("ok:1\n:nouser\n", "line 2"), ("# nothing\n", "no user:password")):
        good.write_text(text)
        with pytest.raises(UsageError, match=where):
            read_auth_file(good)
    with pytest.raises(UsageError, match="cannot read it"):
        read_auth_file(tmp_path / "missing")


def test_the_ui_command_refuses_before_it_builds_anything(tmp_path, monkeypatch):
    from qmoe.cli import build_parser
    from qmoe.commands import ui

    monkeypatch.delenv("QMOE_UI_AUTH", raising=False)
    args = build_parser().parse_args(["ui", "--host", "0.0.0.0", "--runs-dir", str(tmp_path / "runs")])
    with pytest.raises(UsageError, match="--auth-file"):
        ui.run(args)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_qmoe_ui_refuses_to_listen_on_all_interfaces_without_a_login(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QMOE_UI_AUTH"}
    done = qmoe_cli("ui", "--host", "0.0.0.0", "--runs-dir", tmp_path / "runs", timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert "--auth-file" in done.stderr and "--auth-token auto" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was created


@pytest.fixture(scope="module")
def locked_ui(tmp_path_factory):
    """The UI behind a login (alice / wonderland), serving a runs folder with one contract run."""
    root = tmp_path_factory.mktemp("locked")
    write_contract_run(root / "runs", "secret-run-name")
    (root / "models").mkdir()
    accounts = Accounts()
    accounts.add("alice", "wonderland", "test")
    demo = build_app(root / "runs", root / "models")
    with serving(demo, auth=accounts) as url:
        yield url


# routes Gradio 6 serves without checking its login (plus ones it checks); the gate must refuse them all
GATED_GET = ["config", "gradio_api/info", "gradio_api/heartbeat/abc", "gradio_api/app_id", "gradio_api/runs"]
GATED_POST = {
    "gradio_api/cancel": {"session_hash": "x", "fn_index": 0, "event_id": "y"},
    "gradio_api/queue/join": {"data": [], "fn_index": 0, "session_hash": "x"},
    "gradio_api/stream/abc": {"data": [], "fn_index": 0, "session_hash": "x"},
    "gradio_api/reset": {"event_id": "y"},
}


def test_every_route_needs_the_login(locked_ui):
    with httpx.Client(base_url=locked_ui) as anonymous:
        for path in GATED_GET:
            assert anonymous.get(path).status_code == 401, path
        for path, body in GATED_POST.items():
            assert anonymous.post(path, json=body).status_code == 401, path
        page = anonymous.get("")
        # the login form, without the API description Gradio embeds (it lists e.g. every run name)
        assert page.status_code == 200 and "auth_required" in page.text and "secret-run-name" not in page.text
    with pytest.raises(Exception, match="credentials were not provided"):
        Client(locked_ui, verbose=False)
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises a bare ValueError/HTTP error here
        Client(locked_ui, auth=("alice", "wrong"), verbose=False)
    client = Client(locked_ui, auth=("alice", "wonderland"), verbose=False)
    table = client.predict(None, api_name="/runs")[0]
    assert [row[0] for row in table["data"]] == ["secret-run-name"]
    with httpx.Client(base_url=locked_ui, cookies=client.cookies) as logged_in:
        assert logged_in.get("config").status_code == 200
        assert "secret-run-name" in logged_in.get("").text


def test_gradio_alone_leaves_routes_open_that_the_gate_closes(tmp_path):
    """Why qmoe adds its own gate: with only launch(auth=...), Gradio answers some routes without a login."""
    import gradio as gr

    with gr.Blocks() as demo:
        gr.Textbox()
    port = free_port()
    demo.launch(server_port=port, auth=("alice", "wonderland"), prevent_thread_lock=True, quiet=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/") as anonymous:
            assert anonymous.get("config").status_code == 401  # checked by Gradio
            assert anonymous.post("gradio_api/cancel", json=GATED_POST["gradio_api/cancel"]).status_code == 200
    finally:
        demo.close()


@pytest.mark.slow
def test_auth_token_auto_prints_the_login_once_and_stores_nothing(tmp_path):
    runs, port = tmp_path / "runs", free_port()
    command = qmoe_command("ui", "--host", "0.0.0.0", "--port", str(port), "--auth-token", "auto")
    command += ["--runs-dir", str(runs), "--models-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "QMOE_UI_AUTH"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Running on" in line for line in lines):
            assert process.poll() is None, "".join(lines)
            time.sleep(0.2)
        login = next(line for line in lines if "log in as user" in line)
        token = re.search(r"password (\S+)", login).group(1)
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(Exception, match="credentials were not provided"):
            Client(url, verbose=False)
        assert Client(url, auth=("qmoe", token), verbose=False).predict(None, api_name="/runs")
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(timeout=10)
        process.stdout.close()
    assert "".join(lines).count(token) == 1  # printed once
    for file in runs.rglob("*"):
        assert not file.is_file() or token.encode() not in file.read_bytes(), file


CHROMIUM = os.environ.get("QMOE_CHROMIUM", "/usr/bin/chromium")


@pytest.mark.browser
@pytest.mark.slow
def test_the_browser_logs_in_before_it_sees_the_tabs(locked_ui):
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (scripts/install_browser.sh installs Debian's)")
    import tempfile

    with playwright_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"], headless=True
        )
        try:
            page = browser.new_page()
            page.goto(locked_ui)
            page.get_by_label("username").fill("alice")
            page.get_by_label("password").fill("wrong")
            page.get_by_role("button", name="Login").click()
            playwright_api.expect(page.get_by_text("Incorrect Credentials")).to_be_visible(timeout=20_000)
            assert page.locator("#train-launch").count() == 0
            page.get_by_label("username").fill("alice")  # the form clears it after a failed attempt
            page.get_by_label("password").fill("wonderland")
            page.get_by_role("button", name="Login").click()
            page.wait_for_selector("#train-launch", timeout=30_000)
            playwright_api.expect(page.locator("#train-runs")).to_contain_text("secret-run-name", timeout=20_000)
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------- one run per device

FAKE_TRAINER = textwrap.dedent("""\
    #!{python}
    # stands in for `python -m qmoe finetune RUN`: "trains" until the run folder holds a file named release
    # (or for $FAKE_TRAIN_SECONDS), then reports finished
    import json, os, sys, time
    run = sys.argv[-1]
    def report(state):
        with open(os.path.join(run, "status.tmp"), "w") as f:
            json.dump({{"state": state, "pid": os.getpid(), "method": "lora"}}, f)
        os.replace(os.path.join(run, "status.tmp"), os.path.join(run, "{status}"))
    report("running")
    end = time.time() + float(os.environ.get("FAKE_TRAIN_SECONDS", "120"))
    while not os.path.exists(os.path.join(run, "release")) and time.time() < end:
        time.sleep(0.05)
    report("finished")
    """)


@pytest.fixture
def fake_python(tmp_path):
    script = tmp_path / "fake-python"
    script.write_text(FAKE_TRAINER.format(python=sys.executable, status=rundir.STATUS))
    script.chmod(0o755)
    return str(script)


def _wait(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _done(manager: RunManager, name: str) -> bool:
    """The run reported finished and its process has exited (so no test leaves a child running)."""
    info = manager.status(name)
    return info["state"] == "finished" and not pid_alive(info["pid"])


CPU_RECIPE = "model: {device: cpu}\nadapter: {method: lora}\n"


def _launch(manager: RunManager, prefix: str, recipe: str = CPU_RECIPE) -> str:
    return manager.launch_in(manager.new_run_dir(prefix), recipe)


def test_a_second_launch_on_a_busy_device_waits_then_runs(tmp_path, fake_python):
    manager = RunManager(tmp_path / "runs", python=fake_python)
    try:
        first = _launch(manager, "first")
        assert _wait(lambda: manager.status(first)["state"] == "running")
        second, third = _launch(manager, "second"), _launch(manager, "third")
        assert manager.status(second)["state"] == "queued" and manager.queue_position(second) == 1
        assert state_label(manager.status(third)) == "queued (position 2)"
        assert not (manager.run_dir(second) / "launch.json").exists()  # nothing started
        other = _launch(manager, "gpu", "model: {device: cuda}\nadapter: {method: lora}\n")
        assert manager.status(other)["state"] in ("starting", "running")  # another device: not queued
        (manager.run_dir(other) / "release").touch()

        (manager.run_dir(first) / "release").touch()
        assert _wait(lambda: manager.status(second)["state"] == "running")
        assert _wait(lambda: _done(manager, first))
        assert state_label(manager.status(third)) == "queued (position 1)"
        assert "cancelled" in manager.stop(third)  # Stop on a queued run cancels it
        assert manager.status(third)["state"] == "cancelled" and manager.queued() == []

        (manager.run_dir(second) / "release").touch()
        assert _wait(lambda: _done(manager, second))
        assert _wait(lambda: _done(manager, other))
        time.sleep(1.5)  # a scheduler pass later: the cancelled run still never started
        assert not (manager.run_dir(third) / "launch.json").exists()
    finally:
        manager.close()


def test_the_queue_survives_a_ui_restart(tmp_path, fake_python):
    manager = RunManager(tmp_path / "runs", python=fake_python)
    first = _launch(manager, "first")
    assert _wait(lambda: manager.status(first)["state"] == "running")
    second = _launch(manager, "second")
    manager.close()  # the UI stops; the first run trains on, the second waits in runs/queue.json
    assert (tmp_path / "runs" / QUEUE_FILE).is_file()

    restarted = RunManager(tmp_path / "runs", python=fake_python)
    try:
        assert state_label(restarted.status(second)) == "queued (position 1)"
        assert restarted.status(first)["state"] == "running"
        (restarted.run_dir(first) / "release").touch()
        assert _wait(lambda: restarted.status(second)["state"] == "running")
        (restarted.run_dir(second) / "release").touch()
        assert _wait(lambda: _done(restarted, second))
        assert _wait(lambda: _done(restarted, first))
    finally:
        restarted.close()
        manager.close()  # the first UI's handle on its child: reaped


def form_args(**changes):
    _, values = recipe_form_values("quickstart")
    values.update(changes)
    return ["quickstart"] + [values[k] for k in FIELD_KEYS]


def test_train_and_monitor_tabs_show_the_queue_position(tmp_path, fake_python):
    runs = RunManager(tmp_path / "runs", python=fake_python)
    running = _launch(runs, "first", "adapter: {method: lora}\n")  # device auto, as the quickstart recipe's
    assert _wait(lambda: runs.status(running)["state"] == "running")
    waiting = _launch(runs, "second", "adapter: {method: lora}\n")
    (tmp_path / "models").mkdir()
    demo = build_app(tmp_path / "runs", tmp_path / "models", runs=runs)
    with serving(demo) as url:
        client = Client(url, verbose=False)
        launched = client.predict(*form_args(), api_name="/launch")[0]
        assert re.search(r"queued \*\*quickstart-.+?\*\* \(position 2\): another run is training", launched), launched
        rows = {row[0]: row for row in client.predict(None, api_name="/runs")[0]["data"]}
        assert rows[waiting][1] == "queued (position 1)" and rows[running][1] == "running"
        assert "state **queued (position 1)**" in client.predict(waiting, api_name="/monitor")[0]
        assert "cancelled" in client.predict(waiting, api_name="/stop")
        rows = {row[0]: row for row in client.predict(None, api_name="/runs")[0]["data"]}
        third = next(name for name in rows if name.startswith("quickstart-"))
        assert rows[waiting][1] == "cancelled" and rows[third][1] == "queued (position 1)"
        assert "cancelled" in runs.cancel(third)
        (runs.run_dir(running) / "release").touch()
        assert _wait(lambda: _done(runs, running))


def test_chat_warns_when_a_run_trains_on_its_device(tmp_path, fake_python):
    (tmp_path / "models").mkdir()
    demo = build_app(tmp_path / "runs", tmp_path / "models", runs=RunManager(tmp_path / "runs", python=fake_python))
    ctx = demo.qmoe_context
    chat = ChatModels(ctx)
    assert chat.training_warning("base:builtin:smollm2-135m-instruct") is None
    name = _launch(ctx.runs, "busy", "adapter: {method: lora}\n")  # device auto, as the chat model's
    assert _wait(lambda: ctx.runs.status(name)["state"] == "running")
    warning = chat.training_warning("base:builtin:smollm2-135m-instruct")
    assert warning and name in warning and "memory" in warning
    (ctx.runs.run_dir(name) / "release").touch()
    assert _wait(lambda: _done(ctx.runs, name))


# ---------------------------------------------------------------------------------------------- checkpoints


class WritesAMarker:
    """A pickle that, loaded with weights_only=False, would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rng_state() -> dict:
    """What Trainer._save_rng_state writes on CPU."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}


def test_training_state_loads_with_the_allow_list_and_a_code_pickle_is_refused(tmp_path):
    good = tmp_path / "rng_state.pth"
    torch.save(rng_state(), good)
    state = load_training_state(good)
    assert state["numpy"][0] == "MT19937" and torch.equal(state["cpu"], torch.random.get_rng_state())
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({**rng_state(), "python": WritesAMarker(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"evil\.pth refused: it would load posix\.system") as refused:
        load_training_state(evil)
    assert "nothing in it was run" in str(refused.value) and "\n" not in str(refused.value)
    legacy = tmp_path / "legacy.pth"  # a plain (non-zip) pickle, as an attacker might write it
    legacy.write_bytes(pickle.dumps({"x": WritesAMarker(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"legacy\.pth refused: it would load posix\.system"):
        load_training_state(legacy)
    assert not marker.exists()
    broken = tmp_path / "broken.pth"
    broken.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"broken\.pth is corrupt or truncated"):
        load_training_state(broken)


@pytest.mark.slow
def test_resume_from_a_tampered_checkpoint_refuses_and_runs_nothing(chat_model_dir, data_dir, tmp_path):
    from pipeline_support import tiny_recipe

    from qmoe.checkpoints import complete_checkpoints
    from qmoe.pipeline import run_finetune
    from qmoe.recipe import validate_recipe

    recipe = validate_recipe(
        tiny_recipe(
            chat_model_dir,
            data_dir,
            tmp_path / "run",
            method="lora",
            train={"max_steps": 2, "checkpoint_steps": 2},
            eval={"enabled": False},
        )
    )
    run_dir = Path(recipe.output_dir)
    assert run_finetune(recipe, run_dir) == 0
    last = complete_checkpoints(run_dir / "checkpoints")[-1]
    (last / "../stage_done.json").resolve().unlink()  # pretend training had not finished
    marker = tmp_path / "code-ran"
    target = last / "rng_state.pth"
    torch.save({**torch.load(target, weights_only=False), "python": WritesAMarker(marker)}, target)
    done = qmoe_cli("finetune", run_dir, "--resume")
    assert done.returncode == 2, done.stderr
    assert f"{target} refused: it would load posix.system" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- load


def test_queue_and_concurrency_limits_are_set(tmp_path):
    demo = build_app(tmp_path / "runs", tmp_path / "models")
    limits = {fn.api_name: (fn.concurrency_limit, fn.concurrency_id) for fn in demo.fns.values() if fn.api_name}
    assert limits["chat"] == (1, "chat-model")
    assert limits["launch"] == (1, "runs") and limits["stop"] == (1, "runs")
    assert limits["monitor"][0] == "default"  # the queue's default_concurrency_limit (4) of build_app


@pytest.mark.slow
def test_eight_clients_are_all_answered_with_bounded_memory(tmp_path, chat_model_dir, fake_python, monkeypatch):
    """5 clients refresh the Monitor every 2 s, 2 chat with a tiny model, 1 launches runs (that queue on
    the one device), all at once for a bounded time, through the login: every request is answered and the
    server process's memory stays bounded."""
    monkeypatch.setenv("FAKE_TRAIN_SECONDS", "1")
    runs = tmp_path / "runs"
    write_contract_run(runs, "moe-run")
    accounts = Accounts()
    accounts.add("alice", "wonderland", "test")
    demo = build_app(runs, chat_model_dir.parent, runs=RunManager(runs, python=fake_python))
    ctx = demo.qmoe_context
    model = f"base:{chat_model_dir.name}"
    counts: dict[str, int] = {"monitor": 0, "chat": 0, "launch": 0}
    seconds: dict[str, list[float]] = {kind: [] for kind in counts}  # per answered request, for the report
    counted = threading.Lock()
    errors: list[str] = []
    with serving(demo, auth=accounts) as url:

        def connect() -> Client:
            return Client(url, auth=("alice", "wonderland"), verbose=False)

        def monitor(client: Client) -> None:
            status = client.predict("moe-run", api_name="/monitor")[0]
            assert "**moe-run**" in status, status
            time.sleep(2.0)

        def chat(client: Client) -> None:
            history = client.predict(model, "What is 2 + 3?", [], 4, 0, api_name="/chat")[0]
            assert history and history[-1]["role"] == "assistant", history

        def launch(client: Client) -> None:
            message = client.predict(*form_args(), api_name="/launch")[0]
            assert message.startswith("**OK:**"), message
            time.sleep(2.0)

        process = psutil.Process()
        warm = connect()
        monitor(warm)
        chat(warm)  # the model is loaded once; later chats reuse it
        baseline = process.memory_info().rss
        peak = baseline
        stop_at = time.monotonic() + 20

        def client_loop(kind: str, work) -> None:
            try:
                client = connect()
                while time.monotonic() < stop_at:
                    began = time.monotonic()
                    work(client)
                    with counted:
                        counts[kind] += 1
                        seconds[kind].append(time.monotonic() - began)
            except Exception as exc:  # noqa: BLE001 - every failure is reported below
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")

        workers = [("monitor", monitor)] * 5 + [("chat", chat)] * 2 + [("launch", launch)]
        threads = [threading.Thread(target=client_loop, args=w, daemon=True) for w in workers]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.5)
        assert not errors, errors
        assert counts["monitor"] >= 5 and counts["chat"] >= 2 and counts["launch"] >= 1, counts
        launched = [n for n in ctx.runs.list_runs() if n != "moe-run"]
        assert len(launched) == counts["launch"]
        assert _wait(lambda: all(_done(ctx.runs, n) for n in launched), timeout=120)
    growth_mb = (peak - baseline) / 2**20
    print(f"load: {counts} requests in 20 s, RSS {baseline / 2**20:.0f} MiB -> peak {peak / 2**20:.0f} MiB")
    for kind, times in seconds.items():  # includes the clients' own pauses (2 s for monitor and launch)
        print(f"  {kind}: mean {sum(times) / len(times):.2f} s, max {max(times):.2f} s per loop")
    assert growth_mb < 512, f"the server grew by {growth_mb:.0f} MiB under load"
