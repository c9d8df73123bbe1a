"""Where the UI may read and write: recipes from the shipped ``recipes/`` folder, runs inside the runs
directory, local models inside the models directory. Every name typed or sent by a browser goes through
:func:`safe_child`, so no request can reach a path elsewhere (no ``..``, no absolute paths, no symlinks out).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# a single path component: letters, digits, dot, dash, underscore; not starting with a dot
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# a Hugging Face hub id: owner/name
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

REPO_ROOT = Path(__file__).resolve().parents[1]


class UnsafePathError(ValueError):
    """A name that would leave the allowed folder, or is not a plain file/folder name."""


def safe_child(root: Path, name: str) -> Path:
    """``root / name`` when ``name`` is one plain component and the result stays inside ``root``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise UnsafePathError(f"{name!r} is not a valid name (letters, digits, '.', '-', '_'; no paths)")
    path = Path(root) / name
    if path.is_symlink():
        raise UnsafePathError(f"{name!r} is a symbolic link; the UI only follows real files and folders")
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise UnsafePathError(f"{name!r} is outside {root}")
    return path


def recipes_dir() -> Path:
    """The shipped recipes: the repository's ``recipes/`` (source checkout or editable install), else the
    copy packaged inside qmoe (wheel install)."""
    candidates = [REPO_ROOT / "recipes"]
    try:
        import qmoe

        candidates.append(Path(qmoe.__file__).resolve().parent / "recipes")
    except ImportError:  # pragma: no cover - qmoe is always installed with the app
        pass
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return candidates[0]


def list_recipes() -> list[str]:
    """Names (file stems) of the shipped recipes, quickstart first."""
    folder = recipes_dir()
    names = sorted(
        p.stem for p in folder.glob("*.yaml") if p.is_file() and not p.is_symlink() and _NAME.fullmatch(p.stem)
    )
    return sorted(names, key=lambda n: (n != "quickstart", n))


def recipe_path(name: str) -> Path:
    path = safe_child(recipes_dir(), f"{name}.yaml")
    if not path.is_file():
        raise UnsafePathError(f"no shipped recipe named {name!r}; available: {', '.join(list_recipes())}")
    return path


def default_runs_dir() -> Path:
    return Path(os.environ.get("QMOE_RUNS_DIR", "runs")).resolve()


def default_models_dir() -> Path:
    """Local model folders the UI may offer: ``$QMOE_UI_MODELS_DIR``, else ``$QMOE_CACHE/models``, else
    ``~/.cache/qmoe/models``."""
    if os.environ.get("QMOE_UI_MODELS_DIR"):
        return Path(os.environ["QMOE_UI_MODELS_DIR"]).resolve()
    cache = Path(os.environ.get("QMOE_CACHE", Path.home() / ".cache" / "qmoe"))
    return (cache / "models").resolve()


def list_local_models(models_dir: Path) -> list[str]:
    """Sub-folders of the models directory that look like a Hugging Face model (have config.json)."""
    if not Path(models_dir).is_dir():
        return []
    return sorted(
        p.name
        for p in Path(models_dir).iterdir()
        if p.is_dir() and not p.is_symlink() and _NAME.fullmatch(p.name) and (p / "config.json").is_file()
    )


def resolve_model_source(value: str, models_dir: Path) -> str:
    """What goes into ``model.source``: a builtin name or hub id unchanged, or the absolute path of a folder
    inside the models directory (given by its name). Anything that would read a folder elsewhere is refused."""
    value = (value or "").strip()
    if not value:
        raise UnsafePathError("model source is empty")
    if value.startswith("builtin:"):
        return value
    local = Path(models_dir) / value
    if _NAME.fullmatch(value) and ".." not in value and local.is_dir():
        return str(safe_child(Path(models_dir), value).resolve())
    if _HUB_ID.fullmatch(value) and ".." not in value:
        return value
    raise UnsafePathError(
        f"model source {value!r}: use builtin:..., a hub id (owner/name), or the name of a model folder "
        f"inside {models_dir}"
    )
