"""qmoe's CPU inference kernels (qmoe/kernels/cpu_decode.cpp, issue 18): built with torch's extension builder,
self-checked, used by every method's eval-mode fast path on CPU, equal to the eager fast path, and replaced by
that eager path with one warning when they cannot be built or disagree."""

import types
import warnings

import pytest
import torch
from test_inference import METHODS, config, randomize

import qmoe
from qmoe import kernels
from qmoe.kernels import cpu_decode
from qmoe.kernels.selfcheck import KernelFallbackWarning


def randomized(model):
    """The model with every adapter tensor random (test_inference.randomize), in eval mode."""
    randomize(model)
    return model.eval()


@pytest.fixture
def fresh_verdict():
    """Forget the process's loaded kernels around a test that replaces them (the next user reloads)."""
    cpu_decode.forget()
    yield
    cpu_decode.forget()


def test_the_kernels_build_and_pass_their_self_check():
    module = cpu_decode.kernels()
    assert module is not None, cpu_decode.status()
    assert cpu_decode.status() == "in use"
    assert cpu_decode.check(module) is None


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_through_the_cpu_kernels_equals_the_eager_fast_path(tiny_4bit, monkeypatch, method):
    """Logits, routing counts and per-token traces, for a padded batch and for greedy decoding (one token per
    forward), with the kernels (QMOE_KERNELS=auto) and without them (QMOE_KERNELS=torch)."""
    model = randomized(qmoe.attach(tiny_4bit(), config(method)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: all-zero rows reach some layers, so top-k ties are exercised too
    runs = {}
    for backend in ("auto", "torch"):
        monkeypatch.setenv("QMOE_KERNELS", backend)
        with torch.no_grad(), qmoe.trace_routing(model):
            logits = model(input_ids=ids, attention_mask=mask).logits
            routing = qmoe.routing(model)
        generated = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        used = {layer._cpu_kernels is not None for layer in qmoe.adapter_layers(model).values()}
        runs[backend] = (logits, routing, generated, used)
    (logits, routing, generated, used), (ref_logits, ref_routing, ref_generated, ref_used) = runs["auto"], runs["torch"]
    assert used == {True} and ref_used == {False}
    # (float rounding: std::exp vs ATen's vectorised exp, summation order, amplified by two layers of large
    # random adapters; each kernel alone matches to 1e-5: its self-check)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(generated, ref_generated)
    assert set(routing) == set(ref_routing) and (method == "lora") == (not routing)
    for name, info in ref_routing.items():
        assert routing[name]["counts"] == info["counts"]
        torch.testing.assert_close(routing[name]["trace"][0], info["trace"][0], rtol=1e-3, atol=1e-3)


def test_loracoe_warmup_stage_runs_the_lora_kernel(tiny_4bit, monkeypatch):
    model = randomized(qmoe.attach(tiny_4bit(), config("loracoe", stage="warmup")))
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    calls = []
    real = cpu_decode.kernels()
    spy = types.SimpleNamespace(**{n: getattr(real, n) for n in ("moelora", "loramoe", "loracoe")})
    spy.lora = lambda *args: calls.append(1) or real.lora(*args)
    monkeypatch.setattr(cpu_decode, "kernels", lambda: spy)
    with torch.no_grad():
        warm = model(input_ids=ids).logits
        monkeypatch.setenv("QMOE_KERNELS", "torch")
        expected = model(input_ids=ids).logits
    assert len(calls) == len(qmoe.adapter_layers(model))
    torch.testing.assert_close(warm, expected, rtol=1e-5, atol=1e-5)


def test_kernels_that_disagree_with_the_eager_path_are_not_used(fresh_verdict, monkeypatch, tiny_4bit):
    real = cpu_decode.kernels()
    cpu_decode.forget()

    def off_by_one(out, *args):  # a MoELoRA kernel with a bug: the self-check must catch it
        result = real.moelora(out, *args)
        out.add_(1.0)
        return result

    broken = types.SimpleNamespace(lora=real.lora, loramoe=real.loramoe, loracoe=real.loracoe, moelora=off_by_one)
    monkeypatch.setattr(cpu_decode, "_build", lambda: broken)
    with pytest.warns(KernelFallbackWarning, match="the moelora kernel differs from the eager path"):
        assert cpu_decode.kernels() is None
    assert cpu_decode.status().startswith("not used: the moelora kernel differs")
    model = randomized(qmoe.attach(tiny_4bit(), config("moelora")))
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per layer or forward
        with torch.no_grad():
            got = model(input_ids=ids).logits
            monkeypatch.setenv("QMOE_KERNELS", "torch")
            expected = model(input_ids=ids).logits
    assert all(layer._cpu_kernels is None for layer in qmoe.adapter_layers(model).values())
    torch.testing.assert_close(got, expected)


def test_a_failed_build_falls_back_with_one_warning(fresh_verdict, monkeypatch):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(cpu_decode, "_build", no_compiler)
    with pytest.warns(KernelFallbackWarning, match="could not be built: RuntimeError: Ninja is required"):
        assert cpu_decode.kernels() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_decode.kernels() is None  # decided once per process
    from qmoe.doctor import check_cpu_adapter_kernels

    check = check_cpu_adapter_kernels()
    assert not check.ok and not check.required and "Ninja is required" in check.detail


def test_a_kernel_that_raises_in_its_self_check_is_not_used(fresh_verdict, monkeypatch):
    real = cpu_decode.kernels()
    cpu_decode.forget()

    def raises(*args):
        raise RuntimeError("z has 41 columns, expected n + n*r = 40")

    broken = types.SimpleNamespace(lora=real.lora, loramoe=real.loramoe, loracoe=raises, moelora=real.moelora)
    monkeypatch.setattr(cpu_decode, "_build", lambda: broken)
    with pytest.warns(KernelFallbackWarning, match="its self-check raised RuntimeError: z has 41 columns"):
        assert cpu_decode.kernels() is None


def test_kernels_serve_only_float32_cpu_weights_under_auto(monkeypatch):
    from qmoe.tuners.base import cpu_kernels_for

    assert cpu_kernels_for(torch.zeros(2, 2)) is cpu_decode.kernels()
    assert cpu_kernels_for(torch.zeros(2, 2, dtype=torch.bfloat16)) is None
    monkeypatch.setenv("QMOE_KERNELS", "torch")
    assert cpu_kernels_for(torch.zeros(2, 2)) is None
    kernels.set_backend("function")
    try:
        monkeypatch.delenv("QMOE_KERNELS")
        assert cpu_kernels_for(torch.zeros(2, 2)) is None
    finally:
        kernels.set_backend(None)


def test_the_kernel_source_ships_with_the_package():
    from importlib.resources import files

    assert files("qmoe.kernels").joinpath("cpu_decode.cpp").is_file()
    assert cpu_decode.SOURCE.is_file()
