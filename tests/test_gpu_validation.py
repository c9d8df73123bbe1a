"""benchmarks/gpu_validation.sh: without CUDA its GPU run stops at once and loudly; its Python half refuses a GPU
test run where tests skipped, and writes summary.md from a run's folder. The whole ``--dry-run`` (the same steps
on CPU with tiny sizes) takes about 6 minutes on a loaded 2-core machine, so it is not run here."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPER = [sys.executable, str(REPO / "benchmarks" / "gpu_validation.py")]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_the_gpu_run_without_cuda_fails_before_touching_anything(tmp_path):
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_validation.sh")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OUT": str(tmp_path / "out")},
        timeout=60,
    )
    assert done.returncode == 3
    assert "CUDA is missing" in done.stderr
    assert (tmp_path / "out" / "steps.tsv").read_text() == ""  # no step ran: setup never touched .venv


def _junit(path: Path, tests: int, skipped: int) -> Path:
    path.write_text(
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" failures="0" errors="0" '
        f'skipped="{skipped}"></testsuite></testsuites>'
    )
    return path


@pytest.mark.parametrize("tests,skipped,code", [(5, 0, 0), (5, 2, 1), (0, 0, 1)])
def test_a_gpu_test_run_with_skips_is_a_failure(tmp_path, tests, skipped, code):
    done = subprocess.run([*HELPER, "tests-ran", str(_junit(tmp_path / "t.xml", tests, skipped))], capture_output=True)
    assert done.returncode == code


def test_summary_of_a_run_folder(tmp_path):
    (tmp_path / "steps.tsv").write_text("setup\tskipped\t0\ndoctor\t0\t4\nquickstart\t1\t30\n")
    checks = [{"name": "cuda", "ok": False, "detail": "CPU build", "fix": "x", "required": False}]
    (tmp_path / "doctor.json").write_text(json.dumps({"ok": True, "checks": checks}))
    _junit(tmp_path / "gpu-tests.xml", 3, 3)
    (tmp_path / "generation.md").write_text("| model | tokens/s |\n|---|---|\n| base | 9.0 |\n")
    done = subprocess.run([*HELPER, "summary", str(tmp_path), "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("## GPU validation — DRY RUN on CPU")
    assert "| quickstart | **FAILED** (exit 1) | 30 s |" in summary and "| setup | skipped | 0 s |" in summary
    assert "0 passed, 0 failed, 3 skipped" in summary and "✗ cuda (optional): CPU build" in summary
    assert "| base | 9.0 |" in summary
