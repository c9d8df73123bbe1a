"""Fused router kernels (issue 5) against their plain PyTorch references, forward and backward, fp32 and bf16.

The Triton kernels run on CPU tensors under the Triton interpreter; TRITON_INTERPRET=1 must be in the
environment before triton is first imported (bitsandbytes/transformers import it), so scripts/test.sh
exports it on machines without a GPU. Without it (or without triton) those cases skip, saying why.
"""

import pytest
import torch

import qmoe
from qmoe import kernels
from qmoe.kernels import loracoe_gate, loracoe_gate_reference, moelora_gate, moelora_gate_reference
from qmoe.kernels.selfcheck import FP32_OUTPUT_TOLERANCE, tolerances

CUDA = torch.cuda.is_available()


def _triton_cpu_problem() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors here, or None when they can."""
    if not kernels.triton_available():
        return "triton is not installed (pip install 'qmoe[kernels]')"
    if not kernels.triton_interpreting():
        return "TRITON_INTERPRET=1 is not set (it must be set before triton is imported; scripts/test.sh does)"
    try:
        moelora_gate(torch.randn(3, 12), 4, 2, 2, "triton")
    except Exception as exc:  # e.g. triton imported before TRITON_INTERPRET was set
        return f"the Triton interpreter failed on CPU: {type(exc).__name__}: {str(exc)[:200]}"
    return None


TRITON_CPU_PROBLEM = _triton_cpu_problem()
gpu = pytest.mark.gpu

# (backend, device) cases: the autograd Function with PyTorch math, Triton interpreted on CPU, Triton on GPU
CASES = [
    pytest.param("function", "cpu", id="function-cpu"),
    pytest.param(
        "triton",
        "cpu",
        id="triton-interpret",
        marks=pytest.mark.skipif(TRITON_CPU_PROBLEM is not None, reason=str(TRITON_CPU_PROBLEM)),
    ),
    pytest.param(
        "triton",
        "cuda",
        id="triton-cuda",
        marks=[gpu, pytest.mark.skipif(not CUDA or not kernels.triton_available(), reason="needs CUDA and triton")],
    ),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def moelora_input(t, n, r, dtype, device, seed=0):
    """z = [router logits | rank activations]; logits well separated so bf16 rounding never ties the top-k."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.stack([torch.randperm(n, generator=g) for _ in range(t)]).float() * 0.5
    logits += torch.rand(t, n, generator=g) * 0.1
    h = torch.randn(t, n * r, generator=g)
    return torch.cat([logits, h], 1).to(device=device, dtype=dtype).requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("n,r,k", [(8, 4, 2), (3, 5, 1), (6, 2, 3)])
def test_moelora_gate_matches_reference(backend, device, dtype, n, r, k):
    t = 37  # not a multiple of any block size: exercises the masked tail
    z = moelora_input(t, n, r, dtype, device)
    z_ref = z.detach().clone().requires_grad_(True)
    gated, probs, ids, gate = moelora_gate(z, n, r, k, backend)
    ref_gated, ref_probs, ref_ids, ref_gate = moelora_gate_reference(z_ref, n, r, k)
    assert gated.dtype == dtype and probs.dtype == torch.float32
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    torch.testing.assert_close(gated.float(), ref_gated.float(), **tolerances(dtype))
    torch.testing.assert_close(probs, ref_probs, **FP32_OUTPUT_TOLERANCE)
    torch.testing.assert_close(gate, ref_gate, **FP32_OUTPUT_TOLERANCE)
    # backward through both differentiable outputs (gated feeds B, probs the balance loss)
    g = torch.Generator().manual_seed(1)
    w_gated = torch.randn(gated.shape, generator=g).to(device)
    w_probs = torch.randn(probs.shape, generator=g).to(device)
    (grad,) = torch.autograd.grad((gated.float() * w_gated).sum() + (probs * w_probs).sum(), z)
    (ref_grad,) = torch.autograd.grad((ref_gated.float() * w_gated).sum() + (ref_probs * w_probs).sum(), z_ref)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tolerances(dtype))


@pytest.mark.parametrize("backend,device", CASES)
def test_moelora_gate_backward_without_probs_gradient(backend, device):
    z = moelora_input(9, 8, 4, torch.float32, device)
    z_ref = z.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(moelora_gate(z, 8, 4, 2, backend)[0].square().sum(), z)
    (ref_grad,) = torch.autograd.grad(moelora_gate_reference(z_ref, 8, 4, 2)[0].square().sum(), z_ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("e,r,factor", [(2, 16, 16.0), (3, 5, 1.0), (1, 8, 8.0)])
def test_loracoe_gate_matches_reference(backend, device, dtype, e, r, factor):
    g = torch.Generator().manual_seed(0)
    t = 37
    z = torch.randn(t, r + e * r, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    gated, weights = loracoe_gate(z, e, r, factor, backend)
    ref_gated, ref_weights = loracoe_gate_reference(z_ref, e, r, factor)
    assert gated.dtype == dtype and not weights.requires_grad
    torch.testing.assert_close(gated.float(), ref_gated.float(), **tolerances(dtype))
    torch.testing.assert_close(weights, ref_weights.detach(), **FP32_OUTPUT_TOLERANCE)
    w = torch.randn(gated.shape, generator=g).to(device)
    (grad,) = torch.autograd.grad((gated.float() * w).sum(), z)
    (ref_grad,) = torch.autograd.grad((ref_gated.float() * w).sum(), z_ref)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tolerances(dtype))


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_token_batch(backend, device):
    z = torch.zeros(0, 40, device=device, requires_grad=True)
    gated, probs, ids, gate = moelora_gate(z, 8, 4, 2, backend)
    assert gated.shape == (0, 32) and ids.shape == (0, 2)
    gated.sum().backward()
    gated, weights = loracoe_gate(torch.zeros(0, 48, device=device), 2, 16, 16.0, backend)
    assert gated.shape == (0, 16)


# ---- the layers routed through the kernels ----------------------------------------------------------------


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qmoe.adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.router.copy_(torch.randn(layer.router.shape, generator=g) * 0.3)


def _loss_and_grads(model, ids, mask, checkpointing):
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    loss = out.loss + qmoe.aux_loss(model)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads, {n: layer.last_counts for n, layer in qmoe.adapter_layers(model).items()}


@pytest.fixture
def force_backend():
    yield kernels.set_backend
    kernels.set_backend(None)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[1] == "cpu"])
@pytest.mark.parametrize("method", ["moelora", "loracoe"])
def test_layer_training_step_same_through_kernels(tiny_4bit, force_backend, method, backend, device, checkpointing):
    """Loss (LM + aux), every adapter gradient and the routing telemetry equal the plain PyTorch path."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    results = {}
    for name in ("torch", backend):
        force_backend(name)
        torch.manual_seed(0)
        model = qmoe.attach(tiny_4bit(), qmoe.AdapterConfig(method=method, dropout=0.0))
        _randomize(model)
        results[name] = _loss_and_grads(model, ids, mask, checkpointing)
    (loss, grads, counts), (ref_loss, ref_grads, ref_counts) = results[backend], results["torch"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads, strict=False):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=2e-5)  # interpreter sums in another order
    for name in ref_counts:
        assert torch.equal(counts[name], ref_counts[name]), name


# ---- backend selection -------------------------------------------------------------------------------


def test_backend_selection(monkeypatch, force_backend):
    x = torch.zeros(1)
    monkeypatch.delenv("QMOE_KERNELS", raising=False)
    assert kernels.backend_for(x) == "torch"  # auto on CPU: the plain PyTorch layers
    monkeypatch.setenv("QMOE_KERNELS", "function")
    assert kernels.backend_for(x) == "function"
    force_backend("torch")  # the API call wins over the environment
    assert kernels.backend_for(x) == "torch"
    force_backend(None)
    monkeypatch.setenv("QMOE_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="QMOE_KERNELS"):
        kernels.backend_for(x)
    with pytest.raises(ValueError, match="auto, triton, function, torch"):
        kernels.set_backend("fast")


def test_forcing_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    if not kernels.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("QMOE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.backend_for(torch.zeros(1))


@gpu
@pytest.mark.skipif(not CUDA or not kernels.triton_available(), reason="needs CUDA and triton")
def test_auto_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("QMOE_KERNELS", raising=False)
    assert kernels.backend_for(torch.zeros(1, device="cuda")) == "triton"
