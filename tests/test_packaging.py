"""The wheel: what it installs, under which names, and that it works beside a user's own ``app.py``."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_for_the_wheel():
    """The package list is explicit (the UI installs under another name than its folder): a new sub-package
    must be added to it, or the wheel silently lacks it."""
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "qmoe").rglob("__init__.py")
        if "recipes" not in p.parts and "__pycache__" not in p.parts
    }
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert "qmoe_app" in listed and pyproject()["tool"]["setuptools"]["package-dir"]["qmoe_app"] == "app"


def test_directly_imported_libraries_are_declared():
    declared = " ".join(pyproject()["project"]["dependencies"])
    for name in ("huggingface_hub", "filelock", "psutil", "transformers", "bitsandbytes", "peft", "datasets"):
        assert name in declared, name


@pytest.mark.slow
def test_wheel_installs_as_qmoe_app_and_works_beside_a_users_app_py(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", ROOT],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    # setuptools warns about deprecated metadata (the license table) on every install: none left
    assert "deprecated" not in built.stderr.lower(), built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("qmoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("app/") for n in names)
    assert "qmoe_app/main.py" in names and "qmoe_app/style.css" in names
    assert any(n.startswith("qmoe/recipes/") and n.endswith(".yaml") for n in names)

    # a fresh venv with only the wheel; its dependencies come from this interpreter's site-packages through a
    # .pth file (a plain path: the editable install's own .pth hooks in there are not run, so the checkout's
    # qmoe cannot leak in)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel], check=True
    )
    work = tmp_path / "work"
    work.mkdir()
    (work / "app.py").write_text("raise SystemExit('the user app.py was imported')\n")
    qmoe = env_dir / "bin" / "qmoe"
    for argv in ([qmoe, "--help"], [qmoe, "ui", "--help"]):
        done = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    located = subprocess.run(
        [python, "-c", "import qmoe, qmoe_app.main; print(qmoe.__file__); print(qmoe_app.main.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert located.returncode == 0, located.stderr[-2000:]
    assert all(str(env_dir) in line for line in located.stdout.splitlines()), located.stdout
