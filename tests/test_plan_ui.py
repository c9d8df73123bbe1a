"""The Train tab's memory estimate: the planner's verdict for the form's recipe, and a launch predicted not to
fit the detected GPU held until confirmed (the GPU size is the only thing simulated: this machine has none)."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

import qmoe_app.memory_estimate as estimate_module  # noqa: E402
from qmoe.recipe import load_recipe  # noqa: E402
from qmoe_app.main import build_app  # noqa: E402
from qmoe_app.recipe_form import FIELD_KEYS, recipe_form_values  # noqa: E402
from qmoe_app.testing import serving  # noqa: E402


def test_estimate_without_a_gpu_is_an_estimate_only():
    est = estimate_module.memory_estimate(load_recipe("recipes/quickstart.yaml", ["model.device=cpu"]))
    assert not est.too_big and est.peak_bytes > 0
    assert "Memory estimate:" in est.markdown and "estimate only" in est.markdown


@pytest.mark.slow
def test_a_launch_predicted_not_to_fit_the_gpu_waits_for_confirmation(tmp_path, monkeypatch):
    # a machine with a 50 MB "GPU" (device auto plans for it); the launched run itself trains nothing
    monkeypatch.setattr(estimate_module, "planned_device", lambda device: "cuda")
    monkeypatch.setattr(estimate_module, "detected_gpu_gib", lambda: 0.05)
    (tmp_path / "models").mkdir()
    demo = build_app(tmp_path / "runs", tmp_path / "models")
    _, values = recipe_form_values("quickstart")
    values.update({"train.max_steps": 1, "data.limit": 2, "eval.enabled": False})
    args = ["quickstart"] + [values[k] for k in FIELD_KEYS]
    with serving(demo) as url:
        client = Client(url, verbose=False)
        message, *_ = client.predict(*args, api_name="/launch")
        assert message.startswith("**Not launched yet:**") and "NOT to fit the detected GPU (0.1 GB)" in message
        assert demo.qmoe_context.runs.list_runs() == []
        message, *_ = client.predict(*args, api_name="/launch")  # confirmed
        assert "launched" in message or "queued" in message
        runs = demo.qmoe_context.runs.list_runs()
        assert len(runs) == 1
        demo.qmoe_context.runs.stop(runs[0])  # the test is about the launch, not the run
