"""Sharing adapters through the Hugging Face Hub: ``qmoe push`` uploads an adapter folder, and
``load_adapter`` / ``qmoe chat`` / ``qmoe eval`` accept a hub repo id where they take a folder.

huggingface_hub does the work (``HfApi.create_repo`` / ``upload_folder``, ``snapshot_download`` into its
cache), and its environment is honoured as it is read when called: ``HF_ENDPOINT`` (a mirror or a private
hub), ``HF_HOME`` / ``HF_HUB_CACHE`` (where downloads are cached), ``HF_TOKEN`` or the token saved by
``hf auth login``, and ``HF_HUB_OFFLINE`` (downloads come from the cache only, and pushing is refused).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

# what an adapter repo holds (and all that is downloaded from one)
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter.safetensors", "README.md"]
_TRUE = ("1", "true", "yes", "on")


def endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT``, else huggingface.co."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """huggingface_hub's download cache, from the environment as it is now (``HF_HUB_CACHE``, else
    ``HF_HOME``/hub, else the library's default)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    now = any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return now or constants.HF_HUB_OFFLINE


def is_repo_id(text: str | os.PathLike) -> bool:
    """Whether ``text`` names a hub repo (``owner/name``) rather than a local path; an existing path always
    wins."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(text)
    if Path(text).expanduser().exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def download_adapter(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of hub adapter ``repo_id`` (downloaded into the hub cache, or found there when
    offline); AdapterError with one line when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .serialization import AdapterError

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    cache = cache_dir()
    is_offline = offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache),
            local_files_only=is_offline,
            allow_patterns=ADAPTER_FILES,
            endpoint=endpoint(),
        )
    except LocalEntryNotFoundError:
        if is_offline:
            raise AdapterError(
                f"adapter folder not found: {repo_id}, nor hub repo {where} in the hub cache {cache} "
                "(HF_HUB_OFFLINE is set: unset it to download from the hub)"
            ) from None
        raise AdapterError(
            f"adapter folder not found: {repo_id}, and hub repo {where} is not in the cache {cache} while the hub "
            f"at {endpoint()} cannot be reached"
        ) from None
    except RevisionNotFoundError:
        raise AdapterError(f"{repo_id} has no revision {revision!r} on {endpoint()}") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise AdapterError(
            f"adapter folder not found: {repo_id}, nor a hub repository of that name you can read on {endpoint()} "
            "(a private repo needs a token: hf auth login, or HF_TOKEN)"
        ) from None
    except HfHubHTTPError as exc:
        raise AdapterError(f"{where}: download from {endpoint()} failed: {str(exc).splitlines()[0]}") from None
    return Path(folder)


def resolve_adapter_path(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local adapter folder for ``source``: the path itself when it exists (or is not a repo id), else the
    hub repo's download."""
    if isinstance(source, Path) or not is_repo_id(source):
        if revision is not None:
            from .serialization import AdapterError

            raise AdapterError(f"a revision ({revision}) applies to hub repo ids, not to the local folder {source}")
        return Path(source).expanduser()
    return download_adapter(str(source), revision)


def push_adapter(
    source: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload an adapter folder (or a run directory's ``adapter/``) to hub repo ``repo_id``, creating the repo
    (``private`` applies to a new repo) and the branch ``revision`` when missing; returns the commit's URL.

    The folder's model card (README.md) goes with it: a run's card is rewritten from the run (recipe, training
    figures, eval.json, the repo id), a bare folder's written only if it has none."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError
    from huggingface_hub.utils import validate_repo_id

    from .modelcard import CARD_FILE, is_generated, write_model_card, write_run_model_card
    from .rundir import ADAPTER, RECIPE
    from .serialization import AdapterError, read_adapter_config

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"REPO_ID {repo_id!r} is not a hub repo id (owner/name): {exc}") from None
    if repo_id.count("/") != 1:
        raise UsageError(f"REPO_ID {repo_id!r} must be owner/name (your user or organisation, then the repo name)")
    path = Path(source).expanduser()
    run_dir = path if (path / RECIPE).is_file() else path.parent if (path.parent / RECIPE).is_file() else None
    folder = path / ADAPTER if (path / RECIPE).is_file() else path
    try:
        config, _, raw = read_adapter_config(folder)
    except AdapterError as exc:
        raise UsageError(str(exc)) from None
    if offline():
        raise UsageError("HF_HUB_OFFLINE is set: pushing needs the hub; unset HF_HUB_OFFLINE (and log in) first")
    card = folder / CARD_FILE
    if run_dir is not None and (not card.exists() or is_generated(card)):
        write_run_model_card(run_dir, folder, repo_id=repo_id)
    elif not card.exists():
        write_model_card(folder, config, raw.get("base_model_name_or_path"), repo_id=repo_id)

    api = HfApi(endpoint=endpoint(), token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            allow_patterns=ADAPTER_FILES,
            commit_message=commit_message or f"qmoe: upload {config.method} adapter",
        )
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = (
            " (log in with hf auth login, or set HF_TOKEN to a token with write access)" if status in (401, 403) else ""
        )
        raise UsageError(f"pushing to {repo_id} on {endpoint()} failed: {str(exc).splitlines()[0]}{hint}") from None
    except LocalTokenNotFoundError:
        raise UsageError(
            f"pushing to {repo_id} needs a hub token: log in with hf auth login, or set HF_TOKEN"
        ) from None
    except Exception as exc:
        # no connection, DNS, TLS: huggingface_hub's HTTP client (httpx) raises its own transport errors
        if not isinstance(exc, OSError) and type(exc).__module__.split(".")[0] not in ("httpx", "httpx2"):
            raise
        raise UsageError(f"pushing to {repo_id}: cannot reach {endpoint()} ({exc})") from None
    return str(getattr(commit, "commit_url", None) or commit)
