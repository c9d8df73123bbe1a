"""``qmoe doctor`` run for real on this machine (text and --json), and its exit status: 1 exactly when a check the
main job needs fails (a required package outside its tested range, too little disk, no GPU with --gpu)."""

import importlib.metadata
import json
import os
import subprocess

import pytest
import torch
from packaging.requirements import Requirement

from qmoe import doctor
from qmoe.cli import main, qmoe_command

EXPECTED = {"python", "torch", "cuda", "bitsandbytes", "triton", "transformers", "peft", "gradio", "dependencies"}
EXPECTED |= {"builtin model", "GSM8K test (offline)", "GSM8K train (offline)", "disk (runs)", "disk (cache)"}


@pytest.mark.slow
def test_doctor_prints_one_line_per_check_and_exits_0_here(tmp_path):
    env = dict(os.environ, QMOE_RUNS_DIR=str(tmp_path / "runs"))
    done = subprocess.run(qmoe_command("doctor"), capture_output=True, text=True, env=env, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(line[0] in "✓✗" for line in lines[:-1]), done.stdout
    assert lines[-1] == "ready: every required check passed"
    names = {line[2:].split(":", 1)[0].removesuffix(" (optional)") for line in lines[:-1]}
    assert EXPECTED <= names
    assert all(" — fix: " in line for line in lines[:-1] if line.startswith("✗"))  # every ✗ says how to fix it
    assert f"{tmp_path / 'runs'}" in done.stdout  # the free-disk check looked where runs go


def test_doctor_json_lists_every_check(capsys, tmp_path):
    assert main(["doctor", "--json", "--runs-dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert EXPECTED <= set(checks)
    for check in checks.values():
        assert set(check) == {"name", "ok", "detail", "fix", "required"}
        assert check["ok"] or check["fix"], check
    bnb = checks["bitsandbytes"]
    assert bnb["ok"] and "forward and backward match the dequantized fp32 matmul" in bnb["detail"]
    assert checks["transformers"]["detail"].startswith(doctor.installed_version("transformers"))
    assert checks["cuda"]["required"] is False  # a CPU machine is a supported machine


def _fake_version(monkeypatch, package, version):
    real = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda name: version if name == package else real(name))


def test_a_required_package_outside_its_range_exits_1_with_the_fix(monkeypatch, capsys, tmp_path):
    _fake_version(monkeypatch, "transformers", "4.46.0")
    assert main(["doctor", "--runs-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("✗ transformers"))
    # the range qmoe's installed metadata declares (what doctor reads), e.g. >=5.24,<5.25
    spec = next(
        str(Requirement(r).specifier) for r in importlib.metadata.requires("qmoe") if r.startswith("transformers")
    )
    spec = ",".join(sorted(spec.split(","), key=lambda part: not part.startswith(">")))
    assert f"4.46.0 is outside the tested range (tested {spec})" in line
    assert line.endswith(f"fix: pip install 'transformers{spec}'")
    assert out.splitlines()[-1] == "broken: transformers (qmoe's main job needs these)"


def test_an_optional_check_failing_still_exits_0(monkeypatch, capsys, tmp_path):
    _fake_version(monkeypatch, "gradio", None)
    assert main(["doctor", "--runs-dir", str(tmp_path)]) == 0
    assert "✗ gradio (optional): not installed — fix: pip install 'gradio>=6.31,<7'" in capsys.readouterr().out


def test_too_little_disk_is_broken(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(doctor, "MIN_FREE_BYTES", 2**62)
    assert main(["doctor", "--runs-dir", str(tmp_path)]) == 1
    assert "✗ disk (runs)" in capsys.readouterr().out


def test_an_unconverted_builtin_model_is_convertible(monkeypatch, tmp_path):
    monkeypatch.setenv("QMOE_CACHE", str(tmp_path / "empty-cache"))
    check = doctor.check_builtin_model()
    assert check.ok and "converts into" in check.detail and "empty-cache" in check.detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_flag_without_a_gpu_exits_1(capsys, tmp_path):
    assert main(["doctor", "--gpu", "--runs-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "✗ cuda:" in out and "broken: cuda" in out


def test_the_ui_system_panel_shows_the_same_checks(tmp_path):
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    from qmoe_app.main import build_app
    from qmoe_app.testing import serving

    (tmp_path / "models").mkdir()
    with serving(build_app(tmp_path / "runs", tmp_path / "models")) as url:
        report = Client(url, verbose=False).predict(api_name="/system")
    assert report.startswith("**Ready:** every check the main job needs passed.")
    for name in EXPECTED:
        assert f"| {name}" in report, name
    assert "| ✓ | bitsandbytes |" in report and str(tmp_path / "runs") in report
