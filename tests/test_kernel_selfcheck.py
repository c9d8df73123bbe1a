"""``auto`` self-checks each Triton kernel before its first use (qmoe.kernels.selfcheck).

On CPU the real Triton kernels run under the interpreter (TRITON_INTERPRET=1, exported by scripts/test.sh)
and QMOE_KERNELS_AUTO_INTERPRET=1 lets ``auto`` consider them for CPU tensors. Failures are injected by
replacing the real Triton entry points: a kernel that does not compile, and kernels returning wrong numbers
(forward or backward).
"""

import warnings

import pytest
import torch

import qmoe
from qmoe import kernels
from qmoe.kernels import selfcheck

if not kernels.triton_available():
    pytest.skip("triton is not installed (pip install 'qmoe[kernels]')", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qmoe.kernels import triton_kernels as tk  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture
def auto(monkeypatch):
    """``auto`` with the interpreted kernels eligible for CPU tensors, no verdicts and no record yet."""
    if not kernels.triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1, set before triton is imported (scripts/test.sh does without a GPU)")
    monkeypatch.delenv("QMOE_KERNELS", raising=False)
    monkeypatch.setenv(selfcheck.AUTO_INTERPRET_ENV, "1")
    monkeypatch.setattr(kernels, "_used", {})
    kernels.set_backend(None)
    selfcheck.forget()
    yield
    selfcheck.forget()
    kernels.set_backend(None)


@triton.jit
def _moelora_fwd_that_does_not_compile(
    z_ptr,
    gated_ptr,
    probs_ptr,
    gate_ptr,
    ids_ptr,
    T,
    stride_z,
    N: tl.constexpr,
    R: tl.constexpr,
    K: tl.constexpr,
    N_P2: tl.constexpr,
    R_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    e = tl.arange(0, 3)  # Triton rejects a non-power-of-2 range when compiling (and when interpreting)
    tl.store(probs_ptr + e, e)


def _wrong_moelora_backward(z, grad_gated, grad_probs, n, r, k, real=tk.moelora_backward):
    return real(z, grad_gated, grad_probs, n, r, k) * 1.5


def _wrong_loracoe_forward(z, e, r, factor, real=tk.loracoe_forward):
    gated, weights = real(z, e, r, factor)
    return gated + 0.1, weights


def _fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, selfcheck.KernelFallbackWarning)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_correct_kernels_pass_and_are_used(auto, dtype):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert kernels.backend_for(torch.zeros(3, 40, dtype=dtype), "moelora", (8, 4, 2)) == "triton"
        assert kernels.backend_for(torch.zeros(3, 48, dtype=dtype), "loracoe", (2, 16)) == "triton"
        assert kernels.backend_for(torch.zeros(3, 48, dtype=dtype)) == "triton"  # every kernel, default shapes
    assert _fallback_warnings(record) == []
    assert kernels.backends_used() == {"moelora": "triton", "loracoe": "triton"}


@pytest.mark.parametrize(
    "kernel,shape,entry,replacement,reason",
    [
        ("moelora", (6, 2, 3), "_moelora_fwd_kernel", _moelora_fwd_that_does_not_compile, "failed to compile or run"),
        ("moelora", (8, 4, 2), "moelora_backward", _wrong_moelora_backward, "backward: d loss / d z differs"),
        ("loracoe", (3, 5), "loracoe_forward", _wrong_loracoe_forward, "forward: gated differs"),
    ],
    ids=["compile-error", "wrong-backward", "wrong-forward"],
)
def test_failing_kernel_falls_back_with_one_warning(auto, monkeypatch, kernel, shape, entry, replacement, reason):
    monkeypatch.setattr(tk, entry, replacement)
    width = shape[0] * (shape[1] + 1) if kernel == "moelora" else shape[1] * (shape[0] + 1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        backends = {kernels.backend_for(torch.zeros(4, width), kernel, shape) for _ in range(5)}
    assert backends == {"torch"}
    (message,) = _fallback_warnings(record)  # exactly one, however often the kernel is asked for
    assert f"the Triton {kernel} kernel" in message and reason in message and "PyTorch path" in message
    used = kernels.backends_used()[kernel]
    assert used.startswith("torch (the Triton kernel failed its self-check") and reason in used
    # another shape class of the same kernel is checked on its own (and passes where the failure is not generic)
    if entry != "_moelora_fwd_kernel":
        other = (4, 2, 1) if kernel == "moelora" else (2, 8)
        other_width = other[0] * (other[1] + 1) if kernel == "moelora" else other[1] * (other[0] + 1)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert kernels.backend_for(torch.zeros(4, other_width), kernel, other) == "torch"
        assert len(_fallback_warnings(record)) == 1


def test_forced_triton_skips_the_check(auto, monkeypatch):
    monkeypatch.setattr(tk, "loracoe_forward", _wrong_loracoe_forward)
    monkeypatch.setenv("QMOE_KERNELS", "triton")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert kernels.backend_for(torch.zeros(2, 48), "loracoe", (2, 16)) == "triton"
    assert _fallback_warnings(record) == []
    assert kernels.backends_used() == {"loracoe": "triton"}


def test_auto_on_cpu_without_the_test_switch_never_checks(auto, monkeypatch):
    monkeypatch.delenv(selfcheck.AUTO_INTERPRET_ENV)
    monkeypatch.setattr(selfcheck, "check", lambda *a: pytest.fail("auto on CPU ran a self-check"))
    assert kernels.backend_for(torch.zeros(2, 40), "moelora", (8, 4, 2)) == "torch"
    assert kernels.backends_used() == {"moelora": "torch"}


def test_the_check_leaves_the_global_rng_and_grad_mode_alone(auto):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with torch.inference_mode():  # e.g. the first forward is a generation
        assert kernels.backend_for(torch.zeros(2, 40), "moelora", (8, 4, 2)) == "triton"
        assert torch.is_inference_mode_enabled()
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_kernel_is_an_error_naming_the_valid_ones(auto):
    with pytest.raises(ValueError, match="moelora, loracoe"):
        kernels.backend_for(torch.zeros(1), "moelora2", (1,))


# ---- through the layers: a broken kernel leaves the training step exactly the PyTorch one --------------------


def _step(model, ids):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss + qmoe.aux_loss(model)
    return loss.detach(), torch.autograd.grad(loss, params)


def _randomized(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in qmoe.adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.router.copy_(torch.randn(layer.router.shape, generator=g) * 0.3)
    return model


def _adapted(tiny_4bit, config, checkpointing):
    model = _randomized(qmoe.attach(tiny_4bit(), config))
    if checkpointing:  # the first forward (and so the self-check) runs inside a checkpointed block
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("method", ["moelora", "loracoe"])
def test_layers_with_a_broken_kernel_train_as_pytorch_with_one_warning(
    auto, monkeypatch, tiny_4bit, method, checkpointing
):
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    config = qmoe.AdapterConfig(method=method, dropout=0.0)
    kernels.set_backend("torch")
    torch.manual_seed(0)
    ref_model = _adapted(tiny_4bit, config, checkpointing)
    for _ in range(2):  # the second step sees filled contrastive queues
        ref_loss, ref_grads = _step(ref_model, ids)
    kernels.set_backend(None)
    entry, replacement = (
        ("moelora_backward", _wrong_moelora_backward)
        if method == "moelora"
        else ("loracoe_forward", _wrong_loracoe_forward)
    )
    monkeypatch.setattr(tk, entry, replacement)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        model = _adapted(tiny_4bit, config, checkpointing)
        for _ in range(2):
            loss, grads = _step(model, ids)
    assert len(_fallback_warnings(record)) == 1
    torch.testing.assert_close(loss, ref_loss)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad)
    assert kernels.backends_used().get(method, "torch").startswith("torch")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_auto_on_cuda_uses_the_kernels_after_their_self_check(monkeypatch, dtype):
    monkeypatch.delenv("QMOE_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_used", {})
    selfcheck.forget()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for kernel, shape in [
            ("moelora", (8, 4, 2)),
            ("moelora", (3, 5, 1)),
            ("loracoe", (2, 16)),
            ("loracoe", (3, 5)),
        ]:
            assert kernels.backend_for(torch.zeros(1, device="cuda", dtype=dtype), kernel, shape) == "triton"
    assert _fallback_warnings(record) == []


# ---- the run says which backend its method ran with -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "function"])
def test_the_run_records_its_kernel_backend(monkeypatch, chat_model_dir, data_dir, tmp_path, backend):
    import json

    from pipeline_support import tiny_recipe

    from qmoe.pipeline import run_finetune
    from qmoe.recipe import validate_recipe

    monkeypatch.setenv("QMOE_KERNELS", backend)
    monkeypatch.setattr(kernels, "_used", {})
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(chat_model_dir, data_dir, run_dir, train={"max_steps": 2}, eval={"enabled": False})
    assert run_finetune(validate_recipe(recipe), run_dir) == 0
    expected = "torch" if backend == "auto" else backend  # auto on CPU: the layers' plain PyTorch path
    assert json.loads((run_dir / "status.json").read_text())["kernel_backend"] == expected
    assert f"kernel backend of moelora: {expected}" in (run_dir / "train.log").read_text()
