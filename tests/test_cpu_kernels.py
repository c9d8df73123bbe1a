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
from qmoe.kernels.cpu_decode import METHOD_IDS
from qmoe.kernels.selfcheck import KernelFallbackWarning
from qmoe.tuners.base import EagerDecoder


def runs_the_kernel(layer) -> bool:
    """Whether the layer's last fast-path forward ran qmoe's CPU kernel (else the eager decoder)."""
    return layer._inference_cache is not None and not isinstance(layer._inference_cache[1], EagerDecoder)


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


@pytest.mark.parametrize("method", ["moelora", "loramoe", "loracoe"])
def test_one_token_calls_reuse_buffers_but_traces_and_telemetry_stay_right(tiny_4bit, monkeypatch, method):
    """A one-token call's routing tensors are the decoder's buffers, overwritten by the next call: a trace over
    several decode steps still holds each step's own routing, and the telemetry read after a step is that
    step's, as on the eager path."""
    model = randomized(qmoe.attach(tiny_4bit(), config(method)))
    steps = [torch.tensor([[token]]) for token in (5, 77, 140, 201)]
    got = {}
    for backend in ("auto", "torch"):
        monkeypatch.setenv("QMOE_KERNELS", backend)
        with torch.no_grad(), qmoe.trace_routing(model):
            for step in steps:
                model(input_ids=step)
            traced = {name: [t.clone() for t in info["trace"]] for name, info in qmoe.routing(model).items()}
        counts = []
        with torch.no_grad():
            for step in steps:  # untraced: read each step's telemetry after it, before the next overwrites
                model(input_ids=step)
                counts.append({name: info["counts"] for name, info in qmoe.routing(model).items()})
        got[backend] = (traced, counts)
        assert {runs_the_kernel(layer) for layer in qmoe.adapter_layers(model).values()} == {backend == "auto"}
    (traced, counts), (ref_traced, ref_counts) = got["auto"], got["torch"]
    assert counts == ref_counts
    for name, ref in ref_traced.items():
        assert len(traced[name]) == len(ref) == len(steps)
        for step_weights, ref_weights in zip(traced[name], ref, strict=True):
            torch.testing.assert_close(step_weights, ref_weights, rtol=1e-3, atol=1e-3)  # (as the test below)
        # the steps differ (so a trace of one reused buffer, holding the last step four times, would fail)
        assert not all(torch.equal(traced[name][0], later) for later in traced[name][1:])


@pytest.mark.parametrize("method, rank", [("lora", 1), ("lora", 5), ("lora", 13), ("loramoe", 12), ("loracoe", 3)])
def test_the_kernels_row_loops_at_every_row_count(tiny_4bit, monkeypatch, method, rank):
    """The loops take eight weight rows per pass, then four, then one: ranks that leave each remainder (and the
    method's router rows beside them) give the eager fast path's logits, prefill and decode."""
    model = randomized(qmoe.attach(tiny_4bit(), config(method, r=rank)))
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(rank))
    logits = {}
    for backend in ("auto", "torch"):
        monkeypatch.setenv("QMOE_KERNELS", backend)
        with torch.no_grad():
            logits[backend] = model(input_ids=ids).logits  # 9 tokens: the loops (up to 16 per call)
            logits[backend, 1] = model(input_ids=ids[:, :1]).logits
        assert {runs_the_kernel(layer) for layer in qmoe.adapter_layers(model).values()} == {backend == "auto"}
    torch.testing.assert_close(logits["auto"], logits["torch"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["auto", 1], logits["torch", 1], rtol=1e-4, atol=1e-4)


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
        used = {runs_the_kernel(layer) for layer in qmoe.adapter_layers(model).values()}
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


@pytest.mark.parametrize("method", METHODS)
def test_batched_decoding_through_the_kernels_equals_the_eager_path(tiny_4bit, monkeypatch, method):
    """Three left-padded rows decoded together: three tokens per forward, the kernels' loops (not BLAS)."""
    model = randomized(qmoe.attach(tiny_4bit(), config(method)))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 256, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    ids[mask == 0] = 0
    out = {}
    for backend in ("auto", "torch"):
        monkeypatch.setenv("QMOE_KERNELS", backend)
        with torch.no_grad():
            out[backend] = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
    assert torch.equal(out["auto"].sequences, out["torch"].sequences)
    # (float rounding of another summation order, as accurate as the eager path's against float64, amplified
    # through the layers by large random adapters)
    for got, expected in zip(out["auto"].logits, out["torch"].logits, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_moelora_decoding_reads_only_the_chosen_experts(tiny_4bit):
    """The kernel's promise for a few tokens: the experts the router did not choose are never read (a NaN in
    their weights cannot reach the output), while the eager path multiplies them by a zero gate."""
    model = randomized(qmoe.attach(tiny_4bit(), config("moelora")))
    layer = next(iter(qmoe.adapter_layers(model).values()))
    x = torch.randn(1, 1, layer.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        layer(x)
        assert runs_the_kernel(layer)
        chosen = set(layer._routing_pending[2].view(-1).tolist())
        unchosen = next(e for e in range(layer.config.num_experts) if e not in chosen)
        r = layer.config.r
        layer.lora_A[unchosen * r : (unchosen + 1) * r] = float("nan")
        assert torch.isfinite(layer(x)).all()
        assert runs_the_kernel(layer)  # (rebuilt after the change: the router and the chosen experts are intact)
        many = x.expand(1, cpu_decode.LOOP_TOKENS["moelora"] + 1, -1).contiguous()  # past the loops: BLAS, all
        assert torch.isnan(layer(many)).any()


def test_loracoe_warmup_stage_runs_the_lora_kernel(tiny_4bit, monkeypatch):
    model = randomized(qmoe.attach(tiny_4bit(), config("loracoe", stage="warmup")))
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    built = []
    real = cpu_decode.kernels()
    spy = types.SimpleNamespace(
        Decoder=lambda method, *args: built.append(method) or real.Decoder(method, *args), Frozen4bit=real.Frozen4bit
    )
    monkeypatch.setattr(cpu_decode, "kernels", lambda: spy)
    with torch.no_grad():
        warm = model(input_ids=ids).logits
        monkeypatch.setenv("QMOE_KERNELS", "torch")
        expected = model(input_ids=ids).logits
    assert built == [METHOD_IDS["lora"]] * len(qmoe.adapter_layers(model))
    torch.testing.assert_close(warm, expected, rtol=1e-5, atol=1e-5)


def test_kernels_that_disagree_with_the_eager_path_are_not_used(fresh_verdict, monkeypatch, tiny_4bit):
    real = cpu_decode.kernels()
    cpu_decode.forget()

    class OffByOne:  # a MoELoRA kernel with a bug: the self-check must catch it
        def __init__(self, method, *args):
            self.decoder, self.method = real.Decoder(method, *args), method

        def run(self, result, x):
            ran = self.decoder.run(result, x)
            if ran is not None and self.method == METHOD_IDS["moelora"]:
                ran[0].add_(1.0)
            return ran

    monkeypatch.setattr(cpu_decode, "_build", lambda: types.SimpleNamespace(Decoder=OffByOne))
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
    assert not any(runs_the_kernel(layer) for layer in qmoe.adapter_layers(model).values())
    torch.testing.assert_close(got, expected)


def test_a_kernel_that_misses_a_parameter_change_is_not_used(fresh_verdict, monkeypatch):
    real = cpu_decode.kernels()
    cpu_decode.forget()

    class NeverStale:  # a decoder that keeps serving weights fused before an optimizer step
        def __init__(self, *args):
            self.decoder = real.Decoder(*args)

        def run(self, result, x):
            ran = self.decoder.run(result, x)
            return ran if ran is not None else (result, None, None)

    monkeypatch.setattr(cpu_decode, "_build", lambda: types.SimpleNamespace(Decoder=NeverStale))
    with pytest.warns(KernelFallbackWarning, match="does not notice a changed parameter"):
        assert cpu_decode.kernels() is None


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

    def raises(method, *args):
        if method == METHOD_IDS["loracoe"]:
            raise RuntimeError("up has 41 rows, expected 48")
        return real.Decoder(method, *args)

    monkeypatch.setattr(cpu_decode, "_build", lambda: types.SimpleNamespace(Decoder=raises))
    with pytest.warns(KernelFallbackWarning, match="its self-check raised RuntimeError: up has 41 rows"):
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
