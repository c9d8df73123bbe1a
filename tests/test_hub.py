"""Sharing (issue 14, item 3): qmoe push, hub repo ids in load_adapter / qmoe chat / qmoe eval, model cards.

No network: :class:`LocalHub` stands in for the hub's server. huggingface_hub has no file-based endpoint, so
the three calls that would go over HTTP (``HfApi.create_repo``, ``HfApi.create_branch``,
``HfApi.upload_folder``) write into a local folder, and ``snapshot_download`` "downloads" from it into the real
hub-cache layout (``models--owner--name/refs``, ``snapshots/<commit>``) and then runs huggingface_hub's own
``snapshot_download(local_files_only=True)`` on that cache — the lookup an offline run makes. qmoe's code
(repo id detection, endpoint / cache / offline handling, the model card, loading) runs as it is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitInfo, ModelCard
from huggingface_hub.utils import filter_repo_objects

import qmoe
from qmoe.cli import main
from qmoe.serialization import AdapterError

REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


class LocalHub:
    """The hub's server as a folder: ``root/<owner>/<name>/<revision>/<files>`` (plus a ``.private`` mark)."""

    def __init__(self, root: Path):
        self.root = root
        self.endpoints: list[str] = []  # the endpoint of every HfApi call (HF_ENDPOINT honoured?)
        self.commits: list[str] = []

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_id

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        hub = self

        def create_repo(api, repo_id, *, private=False, exist_ok=False, repo_type=None, **_):
            hub.endpoints.append(api.endpoint)
            folder = hub.repo(repo_id)
            if folder.exists() and not exist_ok:
                raise FileExistsError(repo_id)
            (folder / "main").mkdir(parents=True, exist_ok=True)
            if private and not (folder / ".private").exists():
                (folder / ".private").touch()
            return f"{api.endpoint}/{repo_id}"

        def create_branch(api, repo_id, *, branch, exist_ok=False, repo_type=None, **_):
            hub.endpoints.append(api.endpoint)
            target = hub.repo(repo_id) / branch
            if not target.exists():
                shutil.copytree(hub.repo(repo_id) / "main", target)

        def upload_folder(api, *, repo_id, folder_path, revision=None, allow_patterns=None, commit_message=None, **_):
            hub.endpoints.append(api.endpoint)
            target = hub.repo(repo_id) / (revision or "main")
            assert target.is_dir(), "the repo (and branch) must exist before an upload"
            files = [p.name for p in Path(folder_path).iterdir() if p.is_file()]
            for name in filter_repo_objects(files, allow_patterns=allow_patterns):
                shutil.copy2(Path(folder_path) / name, target / name)
            oid = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(target.iterdir()))).hexdigest()
            hub.commits.append(commit_message)
            return CommitInfo(
                commit_url=f"{api.endpoint}/{repo_id}/commit/{oid}",
                commit_message=commit_message,
                commit_description="",
                oid=oid,
                _endpoint=api.endpoint,
            )

        def snapshot_download(repo_id, *, revision=None, cache_dir=None, local_files_only=False, **kwargs):
            if not local_files_only:
                source = hub.repo(repo_id) / (revision or "main")
                if source.is_dir():  # "download": lay the files out as huggingface_hub's cache does
                    files = sorted(p for p in source.iterdir() if p.is_file())
                    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
                    storage = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
                    (storage / "refs").mkdir(parents=True, exist_ok=True)
                    (storage / "refs" / (revision or "main")).write_text(commit)
                    snapshot = storage / "snapshots" / commit
                    snapshot.mkdir(parents=True, exist_ok=True)
                    for p in files:
                        shutil.copy2(p, snapshot / p.name)
            kwargs.pop("endpoint", None)
            return REAL_SNAPSHOT_DOWNLOAD(
                repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True, **kwargs
            )

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An online session against a local stand-in hub, with its own HF_HOME and HF_ENDPOINT."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # huggingface_hub read HF_HUB_OFFLINE=1 (the test environment) at import: online for this test
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/local-hub")
    local = LocalHub(tmp_path / "remote")
    local.install(monkeypatch)
    return local


def go_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def trained_adapter(model, method="moelora", seed=1):
    cfg = {"method": method, "dropout": 0.0}
    if method == "moelora":
        cfg.update(num_experts=4, top_k=2, r=2)
    model = qmoe.attach(model, qmoe.AdapterConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qmoe.adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model.eval()


def logits(model):
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("method", ["moelora", "lora"])
def test_push_then_load_by_repo_id_gives_identical_logits_online_and_offline(
    tiny_4bit, tmp_path, hub, monkeypatch, capsys, method
):
    model = trained_adapter(tiny_4bit(), method)
    expected = logits(model)
    qmoe.save_adapter(model, tmp_path / "adapter")

    assert main(["push", str(tmp_path / "adapter"), "me/tiny-adapter"]) == 0
    out = capsys.readouterr().out
    assert "me/tiny-adapter" in out and "http://127.0.0.1:9/local-hub/me/tiny-adapter/commit/" in out
    assert hub.endpoints and set(hub.endpoints) == {"http://127.0.0.1:9/local-hub"}  # HF_ENDPOINT honoured
    remote = hub.repo("me/tiny-adapter") / "main"
    assert {p.name for p in remote.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter.safetensors",
        "README.md",
    }
    assert not (hub.repo("me/tiny-adapter") / ".private").exists()

    fresh = qmoe.load_adapter(tiny_4bit(), "me/tiny-adapter")
    torch.testing.assert_close(logits(fresh.eval()), expected, rtol=0, atol=0)
    # downloaded into HF_HOME's hub cache, in huggingface_hub's layout
    assert (tmp_path / "hf-home" / "hub" / "models--me--tiny-adapter" / "refs" / "main").is_file()

    go_offline(monkeypatch)  # the cached copy is found without the hub
    shutil.rmtree(hub.root)
    again = qmoe.load_adapter(tiny_4bit(), "me/tiny-adapter")
    torch.testing.assert_close(logits(again.eval()), expected, rtol=0, atol=0)


def test_push_private_to_a_branch_and_load_that_revision(tiny_4bit, tmp_path, hub):
    first = trained_adapter(tiny_4bit(), seed=1)
    qmoe.save_adapter(first, tmp_path / "a1")
    assert main(["push", str(tmp_path / "a1"), "me/rev", "--private", "--message", "first"]) == 0
    second = trained_adapter(tiny_4bit(), seed=2)
    qmoe.save_adapter(second, tmp_path / "a2")
    assert main(["push", str(tmp_path / "a2"), "me/rev", "--revision", "v2"]) == 0
    assert (hub.repo("me/rev") / ".private").exists() and (hub.repo("me/rev") / "v2").is_dir()
    assert hub.commits == ["first", "qmoe: upload moelora adapter"]
    torch.testing.assert_close(logits(qmoe.load_adapter(tiny_4bit(), "me/rev").eval()), logits(first))
    at_v2 = qmoe.load_adapter(tiny_4bit(), "me/rev", revision="v2").eval()
    torch.testing.assert_close(logits(at_v2), logits(second), rtol=0, atol=0)


def test_push_offline_is_one_line_error(tiny_4bit, tmp_path, hub, monkeypatch, capsys):
    qmoe.save_adapter(trained_adapter(tiny_4bit()), tmp_path / "adapter")
    go_offline(monkeypatch)
    capsys.readouterr()
    assert main(["push", str(tmp_path / "adapter"), "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE" in err
    assert not hub.endpoints  # nothing was attempted


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["push", "{tmp}/missing", "me/x"], "adapter folder not found"),
        (["push", "{tmp}/adapter", "not a repo id"], "REPO_ID"),
        (["push", "{tmp}/adapter", "just-a-name"], "owner/name"),
    ],
)
def test_push_refuses_bad_input_in_one_line(tiny_4bit, tmp_path, hub, capsys, args, expected):
    qmoe.save_adapter(trained_adapter(tiny_4bit()), tmp_path / "adapter")
    capsys.readouterr()
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_repo_id_offline_and_not_cached_names_the_cache_and_the_variable(tiny_4bit, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(AdapterError, match=r"adapter folder not found: me/absent.*empty-home.*HF_HUB_OFFLINE"):
        qmoe.load_adapter(tiny_4bit(), "me/absent")


def test_a_local_folder_wins_over_a_repo_id_of_the_same_name(tiny_4bit, tmp_path, monkeypatch):
    model = trained_adapter(tiny_4bit())
    monkeypatch.chdir(tmp_path)
    qmoe.save_adapter(model, Path("me") / "local")
    fresh = qmoe.load_adapter(tiny_4bit(), "me/local")  # a relative path that looks like owner/name
    torch.testing.assert_close(logits(fresh.eval()), logits(model), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ model cards


def test_save_adapter_writes_a_model_card_and_keeps_a_readme_of_your_own(tiny_4bit, tmp_path):
    model = trained_adapter(tiny_4bit())
    qmoe.save_adapter(model, tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.library_name == "qmoe"
    assert {"qmoe", "moelora", "mixture-of-experts", "nf4"} <= set(card.data.tags)
    assert "| num_experts | `4` |" in card.text and "| top_k | `2` |" in card.text
    assert card.data.base_model is None  # a local folder is not a hub id (the text names it)
    assert str(model.config._name_or_path) in card.text

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my own notes\n")
    qmoe.save_adapter(model, mine)
    assert (mine / "README.md").read_text() == "my own notes\n"


def test_lora_card_says_peft_and_builtin_base_names_its_hub_repo(tiny_4bit, tmp_path):
    from qmoe.modelcard import build_model_card

    card = build_model_card(
        qmoe.AdapterConfig(method="lora"),
        "/somewhere/else/.cache/qmoe/smollm2-135m-instruct",  # the builtin model's converted folder
        eval_result={"task": "gsm8k", "n": 8, "correct": 2, "accuracy": 0.25, "scorer": "math-verify"},
        repo_id="me/lora",
    )
    card = ModelCard(str(card))
    assert card.data.library_name == "peft"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.eval_results[0].metric_value == 0.25
    assert "PeftModel.from_pretrained" in card.text and "| gsm8k | math-verify | 8 | 2 | 0.2500 |" in card.text


# ------------------------------------------------------------------------------------------ chat / eval by repo id


def test_eval_and_chat_take_a_repo_id(chat_model_dir, data_dir, tmp_path, hub, monkeypatch, capsys):
    from qmoe.chat import resolve_adapter
    from qmoe.models import load_base_model

    model, _, _ = load_base_model(str(chat_model_dir), "nf4", "float32", "cpu")
    qmoe.attach(model, qmoe.AdapterConfig(method="lora", r=2))
    qmoe.save_adapter(model, tmp_path / "adapter")
    assert main(["push", str(tmp_path / "adapter"), "me/chatty"]) == 0

    source, _, _, folder = resolve_adapter("me/chatty")
    assert source == str(chat_model_dir) and (folder / "adapter_config.json").is_file()
    assert "hf-home" in str(folder)

    monkeypatch.chdir(tmp_path)
    args = ["eval", "me/chatty", "--data", str(data_dir / "test.jsonl"), "--limit", "2", "--max-new-tokens", "4"]
    assert main(args) == 0
    result = json.loads((tmp_path / "me--chatty-eval.json").read_text())  # not into the hub cache
    assert result["n"] == 2 and result["adapter"] == "me/chatty" and result["scorer"] == "exact"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "adapter"), "--revision", "v1"]) == 2
    assert "--revision applies to hub repo ids" in capsys.readouterr().err


@pytest.mark.slow
def test_pushing_a_run_writes_its_card_from_the_run_and_peft_loads_the_pull(chat_model_dir, data_dir, tmp_path, hub):
    from peft import PeftModel
    from pipeline_support import tiny_recipe

    from qmoe.models import load_base_model
    from qmoe.pipeline import run_finetune
    from qmoe.recipe import validate_recipe

    run_dir = tmp_path / "run"
    recipe = validate_recipe(
        tiny_recipe(
            chat_model_dir,
            data_dir,
            run_dir,
            method="lora",
            train={"max_steps": 2},
            eval={"limit": 2, "scorer": "math-verify"},
        )
    )
    assert run_finetune(recipe, run_dir) == 0
    local_card = ModelCard.load(run_dir / "adapter" / "README.md")
    assert local_card.data.eval_results[0].metric_type == "accuracy"
    assert "| math-verify | 2 |" in local_card.text  # the run's eval.scorer and limit

    assert main(["push", str(run_dir), "me/run"]) == 0
    card = ModelCard.load(hub.repo("me/run") / "main" / "README.md")
    assert card.data.library_name == "peft" and "qmoe chat me/run" in card.text and "## Recipe" in card.text
    assert card.data.eval_results[0].metric_value == json.loads((run_dir / "eval.json").read_text())["accuracy"]

    model, _, _ = load_base_model(str(chat_model_dir), "nf4", "float32", "cpu")
    expected = logits(qmoe.load_adapter(model, run_dir / "adapter").eval())
    folder = huggingface_hub.snapshot_download("me/run", cache_dir=str(tmp_path / "hf-home" / "hub"))
    base, _, _ = load_base_model(str(chat_model_dir), "nf4", "float32", "cpu")
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=1e-5, atol=1e-5)
