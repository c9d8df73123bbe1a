"""bitsandbytes' 4-bit CPU kernel called directly (qmoe/kernels/bnb_cpu.py, issue 18): adapter layers and the
:class:`qmoe.inference.Direct4bit` wrapper compute exactly what ``Linear4bit.forward`` computes, notice when
bitsandbytes repacks or replaces the weights, and fall back to bitsandbytes' forward with one warning when the
direct call fails its self-check. Runs where bitsandbytes uses its built-in bf16 CPU kernel (AVX512-BF16 CPUs)."""

import warnings

import bitsandbytes as bnb
import pytest
import torch
from test_inference import METHODS, config, randomize

import qmoe
from qmoe.inference import Direct4bit, call_4bit_directly, dequantize_frozen
from qmoe.kernels import bnb_cpu, cpu_decode
from qmoe.kernels.selfcheck import KernelFallbackWarning

pytestmark = pytest.mark.skipif(
    bnb_cpu.hub_kernel_state() != "builtin",
    reason="bitsandbytes does not run its built-in bf16 CPU kernel here (no AVX512-BF16, or the hub kernel)",
)


@pytest.fixture
def via_forward():
    """Adapter layers built inside the block call bitsandbytes' forward (the reference), then direct again."""

    class Switch:
        def __enter__(self):
            bnb_cpu.set_direct_calls(False)

        def __exit__(self, *exc):
            bnb_cpu.set_direct_calls(True)

    yield Switch()
    bnb_cpu.set_direct_calls(True)


@pytest.fixture
def fresh_verdict():
    bnb_cpu.forget()
    yield
    bnb_cpu.forget()


def ids(seed=0, length=9):
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(seed))


def direct_layers(model):
    """The adapter layers whose decoder computes their frozen layer itself."""
    return [layer for layer in qmoe.adapter_layers(model).values() if (layer._inference_cache or (0, 0, None))[2]]


def reference_logits(model, x):
    """The model's logits on the training code path (bitsandbytes' forward, the adapter's reference step)."""
    qmoe.tuners.base.set_fast_inference(False)
    try:
        return model(input_ids=x).logits
    finally:
        qmoe.tuners.base.set_fast_inference(True)


def decode(model, prompt, steps=4):
    """Logits of a prefill and ``steps`` one-token steps with a KV cache (greedy)."""
    out = model(input_ids=prompt, use_cache=True)
    logits = [out.logits]
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=token, cache=out.cache, use_cache=True)
        logits.append(out.logits)
    return logits


def test_the_direct_call_passes_its_self_check():
    module = cpu_decode.kernels()
    assert module is not None
    assert bnb_cpu.check(module) is None
    assert bnb_cpu.usable(module) and bnb_cpu.status() == "in use"


@pytest.mark.parametrize("method", METHODS)
def test_adapter_layers_compute_their_frozen_layer_bit_for_bit(tiny_4bit, via_forward, method):
    """Prefill and decode logits equal, to the bit, those of the same adapter over bitsandbytes' forward."""
    direct = qmoe.attach(tiny_4bit(), config(method)).eval()
    randomize(direct)
    with via_forward:
        reference = qmoe.attach(tiny_4bit(), config(method)).eval()
        randomize(reference)
        with torch.no_grad():
            expected = decode(reference, ids())
        assert not direct_layers(reference)
    with torch.no_grad():
        decode(direct, ids(1))  # the first forward repacks and builds; later ones call the kernel directly
        got = decode(direct, ids())
    assert len(direct_layers(direct)) == len(qmoe.adapter_layers(direct))
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_a_changed_adapter_and_repacked_weights_are_noticed(tiny_4bit):
    model = qmoe.attach(tiny_4bit(), config("moelora")).eval()
    randomize(model)
    x = ids()
    with torch.no_grad():
        model(input_ids=x)
        assert direct_layers(model)
        randomize(model, seed=5)  # in place, as an optimizer step or a load
        got = model(input_ids=x).logits
        torch.testing.assert_close(got, reference_logits(model, x), rtol=1e-5, atol=1e-5)
        # bitsandbytes' state_dict undoes its CPU packing (re-quantising absmax: the weights change slightly) and
        # the next forward packs again (new tensors, which may reuse freed addresses): every layer notices and
        # computes with the weights as they are now, as bitsandbytes' forward does
        for _ in range(3):
            model.state_dict()
            got = model(input_ids=x).logits
            # (stale weights: off by ~0.5)
            torch.testing.assert_close(got, reference_logits(model, x), rtol=1e-4, atol=1e-4)
        assert len(direct_layers(model)) == len(qmoe.adapter_layers(model))


def test_direct4bit_wraps_the_unadapted_layers_and_computes_them_bit_for_bit(tiny_4bit):
    base = tiny_4bit().eval()
    wrapped = tiny_4bit().eval()
    count = sum(isinstance(m, bnb.nn.Linear4bit) for m in wrapped.modules())
    assert call_4bit_directly(wrapped, "cpu") == count > 0
    assert call_4bit_directly(tiny_4bit(), "cuda") == 0  # CPU only
    with torch.no_grad():
        expected = decode(base, ids())
        decode(wrapped, ids(1))
        got = decode(wrapped, ids())
        held = [m._frozen for m in wrapped.modules() if isinstance(m, Direct4bit)]
        assert len(held) == count and all(h is not None and h[0] is not None for h in held)
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e)
        for _ in range(3):  # repacked weights are noticed (see above)
            base.state_dict(), wrapped.state_dict()
            assert torch.equal(wrapped(input_ids=ids()).logits, base(input_ids=ids()).logits)
    # an adapted model: the adapter layers make the call themselves, only the other layers are wrapped
    only_q = qmoe.attach(tiny_4bit(), qmoe.AdapterConfig(method="lora", r=4, target_modules=["q_proj"])).eval()
    others = sum(isinstance(m, bnb.nn.Linear4bit) for m in only_q.modules()) - len(qmoe.adapter_layers(only_q))
    assert call_4bit_directly(only_q, "cpu") == others


def test_direct4bit_runs_the_layer_s_forward_when_training_or_replaced(tiny_4bit):
    wrapped = tiny_4bit().eval()
    call_4bit_directly(wrapped, "cpu")
    x = ids()
    with torch.no_grad():
        wrapped(input_ids=x)
        dense = tiny_4bit().eval()
        dense(input_ids=x)  # packed for the CPU kernel first, as the wrapped model's layers are (see dequantize_frozen)
        dequantize_frozen(dense, "on", "cpu")
        expected = dense(input_ids=x).logits
        # the dequantised copy replaces the 4-bit layers inside the wrappers: they compute the dense layers now
        dequantize_frozen(wrapped, "on", "cpu")
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in wrapped.modules())
        assert torch.equal(wrapped(input_ids=x).logits, expected)
    trained = tiny_4bit()
    call_4bit_directly(trained, "cpu")
    trained.train()
    out = trained(input_ids=x).logits  # autograd through bitsandbytes' forward, not the direct call
    assert out.requires_grad
    assert all(m._frozen is None for m in trained.modules() if isinstance(m, Direct4bit))


def test_a_direct_call_that_differs_is_not_used(tiny_4bit, fresh_verdict, monkeypatch, via_forward):
    """The nf4 kernel's address handed out for fp4 weights (a renamed or reordered C library): the self-check sees
    outputs that differ, says so once, and every layer runs bitsandbytes' forward."""
    real = bnb_cpu.kernel_address
    monkeypatch.setattr(bnb_cpu, "kernel_address", lambda quant_type: real("nf4"))
    with pytest.warns(KernelFallbackWarning, match="fp4, torch.float32, 1 tokens: differs from Linear4bit.forward"):
        assert not bnb_cpu.usable(cpu_decode.kernels())
    assert bnb_cpu.status().startswith("not used: fp4")
    model = qmoe.attach(tiny_4bit(), config("lora")).eval()
    randomize(model)
    with via_forward:
        reference = qmoe.attach(tiny_4bit(), config("lora")).eval()
        randomize(reference)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")  # decided once per process
        model(input_ids=ids())
        got = model(input_ids=ids()).logits
        assert torch.equal(got, reference(input_ids=ids()).logits)
    assert not direct_layers(model)


def test_an_adapter_attaches_to_a_model_whose_layers_call_the_kernel_directly(tiny_4bit):
    """attach() unwraps Direct4bit first (qmoe compare attaches an untrained router to a loaded chat model)."""
    fresh = qmoe.attach(tiny_4bit(), config("moelora")).eval()
    wrapped = tiny_4bit().eval()
    call_4bit_directly(wrapped, "cpu")
    with torch.no_grad():
        wrapped(input_ids=ids())
    model = qmoe.attach(wrapped, config("moelora")).eval()
    assert not any(isinstance(m, Direct4bit) for m in model.modules())
    assert len(qmoe.adapter_layers(model)) == len(qmoe.adapter_layers(fresh))
    randomize(model), randomize(fresh)  # (the same values: layer order and seed)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, fresh(input_ids=ids()).logits)


def test_chat_models_call_the_4bit_kernel_directly(chat_model_dir):
    from qmoe.chat import load_chat_model

    chat = load_chat_model(None, base_source=str(chat_model_dir), device="cpu", dequantize="off")
    parents = [p for p in chat.model.modules() for m in p.children() if isinstance(m, bnb.nn.Linear4bit)]
    assert parents and all(isinstance(p, Direct4bit) for p in parents)


def test_new_weights_are_noticed(tiny_4bit):
    """bitsandbytes replaces a layer's data when it (un)packs. The kernel keeps the data it was made for alive,
    so new data never takes its address (seen once in the builtin model before it did: freed and reused, and the
    old absmax served), and a new address is a change."""
    model = tiny_4bit().eval()
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(1, 1, layer.in_features)
    with torch.no_grad():
        expected = layer(x)  # (packs it)
        frozen = bnb_cpu.frozen_kernel(cpu_decode.kernels(), layer)
        assert torch.equal(frozen.run(x), expected)
        for _ in range(20):
            layer.weight.data = layer.weight.data.clone()
            assert frozen.run(x) is None
        again = bnb_cpu.frozen_kernel(cpu_decode.kernels(), layer)
        assert again.run(x) is not None
        layer.weight.add_(0)  # an in-place change counts too
        assert again.run(x) is None


@pytest.mark.slow
def test_compiled_decode_calls_the_kernel_as_an_operator(tiny_4bit):
    """Compiled decode steps call the direct call as the operator qmoe::gemv_4bit_cpu (an adapter layer's frozen
    layer, and a Direct4bit's), generate what the eager path generates, and go back to bitsandbytes' forward
    (recompiling) when bitsandbytes undid its packing."""
    from test_inference import greedy

    from qmoe.inference import compile_decode

    only_q = qmoe.AdapterConfig(method="lora", r=4, target_modules=["q_proj"], dropout=0.0)
    model = qmoe.attach(tiny_4bit(), only_q).eval()
    randomize(model)
    assert call_4bit_directly(model, "cpu") > 0  # the projections the adapter leaves
    prompt = ids(3, 7)[:1]
    expected_ids, expected_logits = greedy(model, prompt)
    step = compile_decode(model, "cpu")
    assert all(layer._compiled_weights[3] is not None for layer in qmoe.adapter_layers(model).values())
    got_ids, got_logits = greedy(model, prompt)  # (compiles)
    assert step.failed is None and step.compiled_steps == 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        greedy(model, prompt)
    wrappers = sum(isinstance(m, Direct4bit) for m in model.modules())
    calls = sum(e.name == "qmoe::gemv_4bit_cpu" for e in prof.events())
    assert calls == 5 * (wrappers + len(qmoe.adapter_layers(model)))  # every 4-bit layer in every compiled step
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-4, rtol=1e-4)
    model.state_dict()  # unpacks every 4-bit layer (and re-quantises its absmax: compare with the eager path anew)
    got_ids, got_logits = greedy(model, prompt)
    assert step.compiled_steps == 15
    step.eager = True
    again_ids, again_logits = greedy(model, prompt)
    assert torch.equal(got_ids, again_ids)
    torch.testing.assert_close(got_logits, again_logits, atol=1e-4, rtol=1e-4)
