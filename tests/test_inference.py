"""Inference speed-ups (issue 18): the eval/no-grad fast path of every adapter layer, the dequantised CPU copy
of the frozen 4-bit weights and LoRA merging, each checked against the plain path on real NF4 layers."""

import copy

import bitsandbytes as bnb
import pytest
import torch

import qmoe
from qmoe.tuners.base import set_fast_inference

METHODS = ["lora", "loramoe", "moelora", "loracoe"]


def config(method, **kw):
    kw.setdefault("dropout", 0.0)
    return qmoe.AdapterConfig(method=method, **kw)


def randomize(model, seed=1):
    """B starts at zero and LoRACoE's router too; give every adapter tensor values so the paths differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qmoe.adapter_layers(model).values():
            for name in layer.adapter_param_names:
                p = getattr(layer, name)
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    return ids, mask


@pytest.fixture
def reference_path():
    """Run the block with the fast path off (the training code path in eval mode), then restore it."""

    class Switch:
        def __enter__(self):
            set_fast_inference(False)

        def __exit__(self, *exc):
            set_fast_inference(True)

    yield Switch()
    set_fast_inference(True)


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_equals_reference_logits_telemetry_and_traces(tiny_4bit, reference_path, method):
    model = qmoe.attach(tiny_4bit(), config(method))
    randomize(model)
    model.eval()
    ids, mask = batch()
    runs = {}
    for name in ("reference", "fast"):
        with torch.no_grad(), qmoe.trace_routing(model):
            if name == "reference":
                with reference_path:
                    logits = model(input_ids=ids, attention_mask=mask).logits
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            runs[name] = (logits, qmoe.routing(model))
    (ref_logits, ref_routing), (fast_logits, fast_routing) = runs["reference"], runs["fast"]
    assert not torch.equal(ref_logits, qmoe.attach(tiny_4bit(), config(method)).eval()(input_ids=ids).logits)
    # (per layer the two agree to float rounding; 14 layers of large random adapters amplify it a little)
    torch.testing.assert_close(fast_logits, ref_logits, atol=1e-3, rtol=1e-3)
    assert set(fast_routing) == set(ref_routing)
    for layer, info in ref_routing.items():
        fast = fast_routing[layer]
        assert fast["counts"] == info["counts"] and fast["tokens"] == info["tokens"] == int(mask.sum())
        torch.testing.assert_close(torch.tensor(fast["load"]), torch.tensor(info["load"]), atol=1e-3, rtol=1e-3)
        assert len(fast["trace"]) == len(info["trace"]) == 1
        torch.testing.assert_close(fast["trace"][0], info["trace"][0], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_layer_output_equals_reference(tiny_4bit, reference_path, method):
    model = qmoe.attach(tiny_4bit(), config(method))
    randomize(model)
    model.eval()
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(2))
    for layer in qmoe.adapter_layers(model).values():
        if layer.in_features != x.shape[-1]:
            continue
        with torch.no_grad():
            with reference_path:
                expected = layer(x)
            torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_greedy_generation_equals_reference(tiny_4bit, reference_path, method):
    model = qmoe.attach(tiny_4bit(), config(method))
    randomize(model)
    model.eval()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with reference_path:
            ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        fast = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(fast, ref)


def test_fused_weights_follow_parameter_changes_and_train_mode(tiny_4bit):
    model = qmoe.attach(tiny_4bit(), config("moelora"))
    randomize(model)
    model.eval()
    ids, _ = batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        layer = next(iter(qmoe.adapter_layers(model).values()))
        assert layer._inference_cache is not None
        for other in qmoe.adapter_layers(model).values():
            other.lora_B.mul_(2.0)  # an in-place change (as an optimizer step): the cached fusion must notice
        after = model(input_ids=ids).logits
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr("qmoe.tuners.base._fast_inference", False)
        expected = model(input_ids=ids).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-3, rtol=1e-3)
    model.train()
    assert layer._inference_cache is None


def test_fused_weights_follow_replaced_parameters_and_moves(tiny_4bit, reference_path):
    """A parameter replaced by another object (setattr, load_state_dict(assign=True)) or moved to another dtype:
    the fast path must not keep serving the weights it fused from the old one."""
    model = qmoe.attach(tiny_4bit(), config("moelora"))
    randomize(model)
    model.eval()
    ids, _ = batch()
    layers = list(qmoe.adapter_layers(model).values())
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for layer in layers:
            layer.lora_B = torch.nn.Parameter(layer.lora_B * 2.0)
        assert all(layer._inference_cache is None for layer in layers)
        after = model(input_ids=ids).logits
        with reference_path:
            expected = model(input_ids=ids).logits
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, expected, atol=1e-3, rtol=1e-3)
        for layer in layers:
            for name in layer.adapter_param_names:
                getattr(layer, name).data = getattr(layer, name).data * 0.5  # new storage, same object
        halved = model(input_ids=ids).logits
        with reference_path:
            torch.testing.assert_close(halved, model(input_ids=ids).logits, atol=1e-3, rtol=1e-3)
        layers[0].double()
        assert layers[0]._inference_cache is None


@pytest.mark.parametrize("method", METHODS)
def test_a_model_copied_after_inference_copies_its_adapter_not_its_decoder(tiny_4bit, method):
    """copy.deepcopy (and pickle) after a fast-path forward: the copy builds its own decoder from its own
    parameters, so changing the copy leaves the original's outputs alone."""
    model = qmoe.attach(tiny_4bit(), config(method))
    randomize(model)
    model.eval()
    ids, _ = batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(input_ids=ids).logits, before)
        for layer in qmoe.adapter_layers(twin).values():
            layer.lora_B.mul_(3.0)
        assert not torch.allclose(twin(input_ids=ids).logits, before)
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_loracoe_stage_switch_rebuilds_the_fusion(tiny_4bit, reference_path):
    model = qmoe.attach(tiny_4bit(), config("loracoe", stage="warmup"))
    randomize(model)
    model.eval()
    ids, _ = batch()
    with torch.no_grad():
        warm = model(input_ids=ids).logits
        qmoe.set_stage(model, "joint")
        joint = model(input_ids=ids).logits
        with reference_path:
            expected = model(input_ids=ids).logits
    assert not torch.allclose(warm, joint)
    torch.testing.assert_close(joint, expected, atol=1e-3, rtol=1e-3)


def test_training_forward_never_takes_the_fast_path(tiny_4bit):
    model = qmoe.attach(tiny_4bit(), config("moelora"))
    model.train()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert qmoe.aux_loss(model).requires_grad and out.loss.requires_grad
    assert all(layer._inference_cache is None for layer in qmoe.adapter_layers(model).values())
    assert isinstance(next(iter(qmoe.adapter_layers(model).values())).base_layer, bnb.nn.Linear4bit)


# ---------------------------------------------------------------------------------------------------------
# dequantised CPU copy of the frozen 4-bit weights


def four_bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@pytest.mark.parametrize("method", [None, "moelora", "lora"])
def test_dequantized_copy_computes_what_the_4bit_layers_compute(tiny_4bit, method):
    from qmoe.inference import dequantize_frozen

    model = tiny_4bit()
    if method is not None:
        qmoe.attach(model, config(method))
        randomize(model)
    ids, mask = batch()
    # bitsandbytes' 4-bit path in fp32: dequantise, then F.linear. (In eval mode on AVX512-BF16 CPUs it
    # repacks the weights for a bf16 kernel instead: bf16 activations and scales, a coarser rounding of the
    # same function; train mode with dropout 0 and no autograd keeps the fp32 path to compare against.)
    model.train()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    assert four_bit_layers(model)
    assert dequantize_frozen(model, "on", "cpu")
    assert not four_bit_layers(model)
    if method is not None:  # the adapters stay, now around dense layers
        assert all(isinstance(layer.base_layer, torch.nn.Linear) for layer in qmoe.adapter_layers(model).values())
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dequantizing_after_the_cpu_repacking_recovers_the_weights(tiny_4bit):
    """A 4-bit layer that already ran in eval mode (repacked for bitsandbytes' bf16 CPU kernel, where the CPU
    has one) still dequantises to its weights."""
    from qmoe.inference import dequantized_linear

    model = tiny_4bit()
    layer = four_bit_layers(model)[0]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = dequantized_linear(layer)(x)
        model.eval()
        layer(x)  # may repack
        torch.testing.assert_close(dequantized_linear(layer)(x), exact, atol=2e-2, rtol=2e-2)  # (bf16 scales)


def test_dequantize_switch(tiny_4bit, monkeypatch):
    from qmoe.errors import UsageError
    from qmoe.inference import dequantize_frozen

    model = tiny_4bit()
    assert not dequantize_frozen(model, "off", "cpu")
    assert not dequantize_frozen(model, "auto", "cuda")  # GPUs keep 4-bit: the memory is what it saves
    # auto on CPU: only where bitsandbytes has no fused bf16 4-bit kernel (it decodes faster than the copy)
    monkeypatch.setattr("qmoe.inference.bnb_has_bf16_cpu_kernel", lambda: True)
    assert not dequantize_frozen(model, "auto", "cpu")
    monkeypatch.setattr("qmoe.inference.bnb_has_bf16_cpu_kernel", lambda: False)
    monkeypatch.setattr("qmoe.inference.free_ram_bytes", lambda: 1024)
    assert not dequantize_frozen(model, "auto", "cpu")  # does not fit in free RAM
    assert four_bit_layers(model)
    with pytest.raises(UsageError, match="--dequantize 'sometimes' is invalid: must be one of auto, on, off"):
        dequantize_frozen(model, "sometimes", "cpu")
    monkeypatch.undo()
    monkeypatch.setattr("qmoe.inference.bnb_has_bf16_cpu_kernel", lambda: False)
    assert dequantize_frozen(model, "auto", "cpu") and not four_bit_layers(model)


# ---------------------------------------------------------------------------------------------------------
# merging LoRA


def test_merged_lora_equals_base_plus_adapter(tiny_4bit):
    from qmoe.inference import merge_lora

    model = qmoe.attach(tiny_4bit(), config("lora"))
    randomize(model)
    model.train()  # the fp32 4-bit path (see test_dequantized_copy_computes_what_the_4bit_layers_compute)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        merged = merge_lora(model).eval()
        got = merged(input_ids=ids, attention_mask=mask).logits
    assert not qmoe.adapter_layers(merged) and qmoe.adapter_config(merged) is None
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["moelora", "loracoe", "loramoe"])
def test_merging_a_mixture_is_refused_saying_why(tiny_4bit, method):
    from qmoe.errors import UsageError
    from qmoe.inference import merge_lora

    model = qmoe.attach(tiny_4bit(), config(method))
    with pytest.raises(UsageError, match=f"a {method} adapter cannot be merged: .*input-dependent routing"):
        merge_lora(model)


def test_qmoe_merge_writes_a_plain_transformers_folder(chat_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from qmoe.chat import load_chat_model
    from qmoe.cli import main

    base = qmoe.attach(load_model_nf4(chat_model_dir), config("lora"))
    randomize(base)
    adapter = qmoe.save_adapter(base, tmp_path / "adapter")
    # (dequantised: the 4-bit path in fp32, as test_dequantized_copy_computes_what_the_4bit_layers_compute shows)
    chat = load_chat_model(adapter, base_source=str(chat_model_dir), device="cpu", dequantize="on")
    assert chat.dequantized and not chat.merged
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = chat.model(input_ids=ids).logits
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), str(out), "--base", str(chat_model_dir), "--device", "cpu"]) == 0
    assert main(["merge", str(adapter), str(out), "--base", str(chat_model_dir)]) == 2  # exists: no overwrite
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(plain.config, "quantization_config", None) is None
    assert not four_bit_layers(plain) and not qmoe.adapter_layers(plain)
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    merged_chat = load_chat_model(adapter, base_source=str(chat_model_dir), device="cpu", merge=True)
    assert merged_chat.merged and merged_chat.routed_layers == []
    with torch.no_grad():
        torch.testing.assert_close(merged_chat.model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bf16_kernel", [True, False])
def test_chat_merge_says_when_the_unmerged_adapter_would_decode_faster(chat_model_dir, tmp_path, caplog, bf16_kernel):
    """On a CPU where bitsandbytes' bf16 kernel keeps the other layers 4-bit, the merge's dense layers are the
    slower choice (BENCHMARKS.md): chat still merges as asked, and says so once."""
    import logging

    import qmoe.inference
    from qmoe.chat import load_chat_model

    only_q = qmoe.AdapterConfig(method="lora", r=4, target_modules=["q_proj"])
    model = qmoe.attach(load_model_nf4(chat_model_dir), only_q)
    randomize(model)
    adapter = qmoe.save_adapter(model, tmp_path / "adapter")
    # which CPU this is decides what --dequantize auto does; both answers are tested on any CPU
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO, logger="qmoe"):
        patch.setattr(qmoe.inference, "bnb_has_bf16_cpu_kernel", lambda: bf16_kernel)
        chat = load_chat_model(adapter, base_source=str(chat_model_dir), device="cpu", merge=True)
    assert chat.merged and chat.dequantized == (not bf16_kernel)  # auto: the dequantised copy without the kernel
    said = [r.getMessage() for r in caplog.records if "chatting without --merge is faster" in r.getMessage()]
    assert len(said) == (1 if bf16_kernel else 0)
    assert four_bit_layers(chat.model) if bf16_kernel else not four_bit_layers(chat.model)


def load_model_nf4(folder):
    from qmoe.models import load_base_model

    return load_base_model(str(folder), "nf4", "auto", "cpu")[0]


# ---------------------------------------------------------------------------------------------------------
# bitsandbytes' CPU kernel notice


def test_importing_qmoe_silences_the_bnb_cpu_kernel_notice_and_doctor_reports_the_kernel():
    import subprocess
    import sys

    from qmoe.doctor import check_cpu_4bit_kernel

    code = "import qmoe, bitsandbytes, logging; logging.getLogger('bitsandbytes').warning('still heard')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "gemm_4bit_forward" not in done.stderr and "still heard" in done.stderr  # only that one line goes
    check = check_cpu_4bit_kernel()
    assert check.ok and not check.required and "4-bit" in check.detail


# ---------------------------------------------------------------------------------------------------------
# compiled decode step (qmoe chat --compile)


def greedy(model, ids, new_tokens=6):
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits, 1)


def eager_greedy(tiny_4bit, method, new_tokens=6):
    """(model, prompt ids, and the ids and logits its uncompiled fast path generates, dynamic cache) for a tiny
    NF4 model with a randomized ``method`` adapter, in eval mode."""
    model = qmoe.attach(tiny_4bit(), config(method))
    randomize(model)
    model.eval()
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    return model, ids, *greedy(model, ids, new_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_compiled_decode_generates_what_the_eager_fast_path_generates(tiny_4bit, method):
    from qmoe.inference import compile_decode

    model, ids, expected_ids, expected_logits = eager_greedy(tiny_4bit, method)
    step = compile_decode(model, "cpu")
    got_ids, got_logits = greedy(model, ids)
    assert step.failed is None and step.compiled_steps == 5  # prefill eager, the 5 one-token steps compiled
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-3, rtol=1e-3)


def test_moelora_compiled_step_reads_only_the_chosen_experts(tiny_4bit):
    """MoELoRA's step under torch.compile gathers the k chosen experts' rows of A and B (the graph's weights are
    row-per-expert): the eager step's output, and the other experts' rows never read: poisoned with NaN, the
    output stays finite. With as many choices as experts (a batch) it runs the eager step on every expert."""
    model = qmoe.attach(tiny_4bit(), config("moelora"))
    randomize(model)
    layer = next(iter(qmoe.adapter_layers(model).values()))
    c = layer.config
    up, down_t = layer.compiled_weights(*layer.fused_weights())
    poisoned_runs = 0
    for tokens in (1, 3, c.num_experts):  # 3 * k < n experts: gathered; n * k >= n: every expert
        flat = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(tokens))
        expected = torch.zeros(tokens, layer.out_features)
        layer.inference_step(expected, flat, up.t().contiguous(), down_t)
        got = torch.zeros_like(expected)
        layer.compiled_step(got, flat, up, down_t)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        chosen = torch.nn.functional.linear(flat, up[: c.num_experts]).topk(c.top_k, dim=-1).indices.unique()
        unread = [e for e in range(c.num_experts) if e not in chosen.tolist()]
        if tokens * c.top_k >= c.num_experts or not unread:
            continue
        poisoned_up, poisoned_down = up.clone(), down_t.clone()
        for e in unread:
            poisoned_up[c.num_experts + e * c.r : c.num_experts + (e + 1) * c.r] = float("nan")
            poisoned_down[e * c.r : (e + 1) * c.r] = float("nan")
        got = torch.zeros_like(expected)
        layer.compiled_step(got, flat, poisoned_up, poisoned_down)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        poisoned_runs += 1
    assert poisoned_runs == 2


@pytest.mark.slow
def test_compiled_decode_follows_a_changed_adapter_and_traced_replies_run_eager(chat_model_dir, tmp_path):
    from pipeline_support import qmoe_cli

    from qmoe.chat import load_chat_model, stream_reply

    model = qmoe.attach(load_model_nf4(chat_model_dir), config("moelora", num_experts=4, top_k=2, r=2))
    randomize(model)
    adapter = qmoe.save_adapter(model, tmp_path / "adapter")
    messages = [{"role": "user", "content": "Tom has 3 apples and buys 5 more."}]

    def reply(chat, **kw):
        return [e for e in stream_reply(chat, messages, max_new_tokens=5, **kw) if e.get("done")][0]

    plain = load_chat_model(adapter, base_source=str(chat_model_dir), device="cpu")
    compiled = load_chat_model(adapter, base_source=str(chat_model_dir), device="cpu", compile=True)
    assert compiled.compiled and not plain.compiled
    assert reply(compiled)["tokens"] == reply(plain)["tokens"]
    step = compiled.model.forward
    assert step.failed is None and step.compiled_steps == 4
    # an adapter changed in place between replies (both models alike): the compiled step serves the new weights
    for chat in (plain, compiled):
        with torch.no_grad():
            for layer in qmoe.adapter_layers(chat.model).values():
                layer.lora_B.mul_(-3.0)
    assert reply(compiled)["tokens"] == reply(plain)["tokens"]
    assert step.compiled_steps == 8
    # a reply that shows routing runs uncompiled (compiled layers record none) and records every token's routing
    traced = reply(compiled, trace=True)
    assert step.compiled_steps == 8 and not step.eager
    assert traced["routing"] and all(w.shape[0] == len(traced["tokens"]) for w in traced["routing"].values())
    assert traced["tokens"] == reply(plain, trace=True)["tokens"]
    # the command line: qmoe chat --compile says so and replies
    printed = qmoe_cli("chat", adapter, "--base", chat_model_dir, "--compile", "--max-new-tokens", "3", input="Hi\n\n")
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert "compiled decode step" in printed.stderr and "Traceback" not in printed.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_on_cuda_the_fast_path_and_the_compiled_step_generate_what_the_reference_path_does(tiny_4bit, method):
    """On a GPU (benchmarks/gpu_validation.sh): the eval fast path (Triton routing kernels where they apply) and the
    compiled decode step (inductor's GPU code, MoELoRA's gathered experts) against the training code path."""
    from qmoe.inference import compile_decode

    model = qmoe.attach(tiny_4bit(device="cuda"), config(method))
    randomize(model)
    model.eval()
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3)).to("cuda")
    set_fast_inference(False)
    try:
        expected_ids, expected_logits = greedy(model, ids)
    finally:
        set_fast_inference(True)
    runs = {"fast path": greedy(model, ids)}
    step = compile_decode(model, "cuda")
    runs["compiled"] = greedy(model, ids)
    assert step.failed is None and step.compiled_steps == 5
    for name, (got_ids, got_logits) in runs.items():
        assert torch.equal(got_ids, expected_ids), name
        torch.testing.assert_close(got_logits, expected_logits, atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.slow
def test_a_decode_step_that_fails_to_compile_runs_eager_after_one_warning(tiny_4bit):
    from qmoe.inference import CompiledDecodeStep, prepare_compiled_decode
    from qmoe.kernels.selfcheck import KernelFallbackWarning

    model, ids, expected_ids, _ = eager_greedy(tiny_4bit, "lora")

    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    prepare_compiled_decode(model)
    model.forward = CompiledDecodeStep(model.forward, backend=no_compiler)
    with pytest.warns(KernelFallbackWarning, match="compiled decode step failed .*no C\\+\\+ compiler") as caught:
        got_ids, _ = greedy(model, ids)
    assert len(caught) == 1 and model.forward.eager and model.forward.compiled_steps == 0
    assert torch.equal(got_ids, expected_ids)


@pytest.mark.slow
def test_layers_compiled_without_prepared_weights_fuse_them_in_the_graph(tiny_4bit):
    from qmoe.inference import CompiledDecodeStep

    model, ids, expected_ids, expected_logits = eager_greedy(tiny_4bit, "moelora", new_tokens=3)
    model.forward = CompiledDecodeStep(model.forward)  # without qmoe.inference.compile_decode's preparation
    got_ids, got_logits = greedy(model, ids, new_tokens=3)
    assert model.forward.compiled_steps == 2 and model.forward.failed is None
    assert torch.equal(got_ids, expected_ids)
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# qmoe bench --generate


@pytest.mark.parametrize("mode", ["on", "off"])
def test_generation_bench_rows_for_every_model_and_batch(chat_model_dir, mode):
    from qmoe.bench.generate import markdown_generation, measure_generation

    result = measure_generation(
        str(chat_model_dir), "cpu", ["moelora", "lora"], (1, 3), new_tokens=2, repeats=1, warmup=0, dequantize=mode
    )
    other = "base-4bit" if mode == "on" else "base-dequantised"
    names = ["base", "wrapper-floor", "moelora", "lora", "lora-merged", "peft-lora", other]
    # the direct 4-bit calls' rows where bitsandbytes' built-in bf16 kernel serves the 4-bit weights
    direct = mode == "off" and hub_kernel_state() == "builtin"
    if direct:
        names += ["base-direct", "moelora-bnb-forward", "lora-bnb-forward"]
    names += ["moelora-eager", "moelora-4bit-reference"]
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [(n, b) for b in (1, 3) for n in names]
    for row in result["rows"]:
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["decode_cpu_s"] >= 0
        if row["model"] == "base":
            assert row["decode_ratio_to_base"] == 1.0
        if row["model"] == "base-direct":
            assert row["decode_ratio_to_base_direct"] == 1.0
        assert (row["decode_ratio_to_base_direct"] is not None) == direct
    assert result["meta"]["frozen_weights"] == ("dequantised copy of NF4" if mode == "on" else "NF4")
    table = markdown_generation(result)
    assert "| moelora-4bit-reference | 3 |" in table and "decode × base (CPU)" in table
    assert "| base | 1 |" in table and "| 1.00 | 1.00 | 1.00 |" in table  # one round: no range in brackets
    assert "decode × base-direct (wall)" in table and ("| 1.00 |" if direct else "| – |") in table
    assert "CPU kernels: in use" in table and result["meta"]["cpu_kernels"] == "in use"
    rows = {(r["model"], r["batch"]): r for r in result["rows"]}
    assert rows[("peft-lora", 1)]["trainable_params"] == rows[("lora", 1)]["trainable_params"]


def hub_kernel_state():
    from qmoe.kernels.bnb_cpu import hub_kernel_state

    return hub_kernel_state()


def test_generation_ratios_pair_each_round_with_the_base_run_of_the_same_round():
    from qmoe.bench.generate import paired_ratios, ratio_cell

    # (prefill, prefill cpu, decode, decode cpu) per round: the machine slows down 2x in round 2 for both
    runs = {
        "base": [(1.0, 1.0, 10.0, 10.0), (2.0, 2.0, 20.0, 20.0), (1.0, 1.0, 10.0, 10.0)],
        "adapter": [(1.0, 1.0, 12.5, 12.5), (2.0, 2.0, 20.0, 25.0), (1.0, 1.0, 10.0, 11.0)],
    }
    summary = paired_ratios(runs)
    adapter = summary["adapter"]
    # round ratios 0.8, 1.0, 1.0 (wall): the median of the pairs, not the ratio of medians (10/12.5)
    assert adapter["decode_s_ratio"] == 1.0 and adapter["decode_s_ratio_range"] == [0.8, 1.0]
    assert adapter["decode_cpu_s_ratio"] == 0.8 and adapter["decode_cpu_s_ratio_range"] == [0.8, pytest.approx(10 / 11)]
    assert adapter["decode_s"] == 12.5  # the times themselves: medians over rounds
    assert summary["base"]["decode_s_ratio_range"] == [1.0, 1.0]
    assert ratio_cell(adapter, "decode_s") == "1.00 (0.80–1.00)" and ratio_cell(summary["base"], "decode_s") == "1.00"


@pytest.mark.slow
def test_generation_bench_adds_compiled_rows_at_every_batch_size(chat_model_dir):
    from qmoe.bench.generate import measure_generation

    result = measure_generation(
        str(chat_model_dir), "cpu", ["lora", "moelora"], (1, 2), new_tokens=2, repeats=1, warmup=0, compiled=True
    )
    rows = {(r["model"], r["batch"]): r for r in result["rows"]}
    compiled = {(f"{name}-compiled", batch) for name in ("base", "lora", "moelora") for batch in (1, 2)}
    assert compiled <= set(rows)  # (batch 1: chat; larger: whether evaluation would gain from compiling)
    for name, batch in compiled:
        assert rows[name, batch]["decode_tokens_per_s"] > 0
    assert rows[("lora-compiled", 1)]["trainable_params"] == rows[("lora", 1)]["trainable_params"] > 0


def test_generation_bench_command_checks_its_options(capsys):
    from qmoe.cli import main

    assert main(["bench", "--generate", "--device", "cpu", "--new-tokens", "0"]) == 2
    assert "--new-tokens must be >= 1 (got 0)" in capsys.readouterr().err
    assert main(["bench", "--generate", "--device", "cpu", "--methods", "moe"]) == 2
    assert "unknown method" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["moelora", "loracoe"])
def test_fast_path_through_the_triton_kernels_equals_reference(tiny_4bit, reference_path, method):
    """The fast path calls the fused Triton forward directly where that backend is picked (CUDA decode); here
    under the Triton interpreter on CPU."""
    from qmoe import kernels

    if not (kernels.triton_available() and kernels.triton_interpreting()):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (set before triton is imported)")
    model = qmoe.attach(tiny_4bit(), config(method))
    randomize(model)
    model.eval()
    ids, mask = batch()
    try:
        kernels.set_backend("triton")
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
            counts = {n: layer.last_counts for n, layer in qmoe.adapter_layers(model).items()}
        assert {layer._inference_backend for layer in qmoe.adapter_layers(model).values()} == {"triton"}
    finally:
        kernels.set_backend(None)
    with torch.no_grad(), reference_path:
        expected = model(input_ids=ids, attention_mask=mask).logits
        for name, layer in qmoe.adapter_layers(model).items():
            assert torch.equal(layer.last_counts, counts[name])
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# chat's generation threads on CPU


def test_chat_generates_with_its_own_thread_count_and_restores_torch_s(chat_model_dir, monkeypatch):
    from qmoe.chat import load_chat_model, stream_reply

    chat = load_chat_model(None, base_source=str(chat_model_dir))
    seen = []
    real_generate = chat.model.generate

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(chat.model, "generate", spy)
    before = torch.get_num_threads()
    messages = [{"role": "user", "content": "hi"}]
    for setting, expected in ((None, 1), ("2", 2)):
        if setting is None:
            monkeypatch.delenv("QMOE_CHAT_THREADS", raising=False)
        else:
            monkeypatch.setenv("QMOE_CHAT_THREADS", setting)
        assert list(stream_reply(chat, messages, max_new_tokens=2))[-1]["done"]
        assert seen[-1] == expected and torch.get_num_threads() == before


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_chat_thread_count_is_a_usage_error(chat_model_dir, monkeypatch, value):
    from qmoe.chat import load_chat_model, stream_reply
    from qmoe.errors import UsageError

    chat = load_chat_model(None, base_source=str(chat_model_dir))
    monkeypatch.setenv("QMOE_CHAT_THREADS", value)
    with pytest.raises(UsageError, match=f"QMOE_CHAT_THREADS={value!r} is invalid"):
        next(stream_reply(chat, [{"role": "user", "content": "hi"}], max_new_tokens=2))
