"""Adapter core (issue 2): the four methods on real NF4/FP4 bitsandbytes layers of tiny Llama models."""

import json

import bitsandbytes as bnb
import pytest
import torch

import qmoe
from qmoe.tuners.lora.reference import lora_reference
from qmoe.tuners.loracoe.reference import loracoe_reference
from qmoe.tuners.loramoe.reference import loramoe_reference
from qmoe.tuners.moelora.losses import expert_contrastive_loss, load_balancing_loss
from qmoe.tuners.moelora.reference import moelora_reference

REFERENCES = {
    "lora": lora_reference,
    "loramoe": loramoe_reference,
    "moelora": moelora_reference,
    "loracoe": loracoe_reference,
}
METHODS = list(REFERENCES)


def config(method, **kw):
    kw.setdefault("dropout", 0.0)
    return qmoe.AdapterConfig(method=method, **kw)


def randomize_b(model, seed=1):
    """B starts at zero; give it values so outputs and gradients are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qmoe.adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            if layer.config.method == "loracoe":
                layer.router.copy_(torch.randn(layer.router.shape, generator=g) * 0.3)


def batch(vocab=256, seed=0, pad_second=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    if pad_second:
        mask[1, :5] = 0  # left padding
    return ids, mask


def q_proj(model):
    return qmoe.adapter_layers(model)["model.layers.0.self_attn.q_proj"]


# ---------------------------------------------------------------------------------------------------------
# equivalences


@pytest.mark.parametrize("method", METHODS)
def test_batched_layer_equals_per_expert_loop(tiny_4bit, method):
    model = qmoe.attach(tiny_4bit(), config(method))
    randomize_b(model)
    layer = q_proj(model)
    x = torch.randn(10, layer.in_features)
    x_ref = x.clone()
    out = layer.delta(x, None)
    ref = REFERENCES[method](layer, x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    params = [getattr(layer, n) for n in layer.adapter_param_names]
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), params)
    ref_grads = torch.autograd.grad(
        (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum(), params, allow_unused=True
    )
    for name, g, rg in zip(layer.adapter_param_names, grads, ref_grads, strict=False):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6, msg=f"{method} grad of {name}")


def test_moelora_single_expert_top1_equals_lora(tiny_4bit):
    lora = qmoe.attach(tiny_4bit(), config("lora", r=4, alpha=8))
    moe = qmoe.attach(tiny_4bit(), config("moelora", r=4, alpha=8, num_experts=1, top_k=1))
    randomize_b(lora)
    with torch.no_grad():
        for name, layer in qmoe.adapter_layers(moe).items():
            src = qmoe.adapter_layers(lora)[name]
            layer.lora_A.copy_(src.lora_A)
            layer.lora_B.copy_(src.lora_B)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            moe(input_ids=ids, attention_mask=mask).logits,
            lora(input_ids=ids, attention_mask=mask).logits,
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("scale", ["rank", "paper"])
def test_loracoe_matches_paper_double_sum(tiny_4bit, scale):
    model = qmoe.attach(tiny_4bit(), config("loracoe", r=8, num_experts=3, composition_scale=scale))
    randomize_b(model)
    layer = q_proj(model)
    x = torch.randn(7, layer.in_features)
    # (1/E) sum_i sum_j G_ij B_j A_j x written independently of the layer's code, per token
    e_count, r = 3, 8
    expected = torch.zeros(7, layer.out_features)
    for t in range(7):
        for i in range(e_count):
            g = torch.softmax(layer.router[i * r : (i + 1) * r] @ x[t], dim=0)
            for j in range(r):
                expected[t] += g[j] * layer.lora_B[:, j] * (layer.lora_A[j] @ x[t])
    expected = expected / e_count * layer.scale * (r if scale == "rank" else 1)
    torch.testing.assert_close(layer.delta(x, None), expected, rtol=1e-4, atol=1e-6)


def test_loracoe_warmup_is_plain_lora_and_zero_router_continues_it(tiny_4bit):
    model = qmoe.attach(tiny_4bit(), config("loracoe"))
    randomize_b(model)
    layer = q_proj(model)
    with torch.no_grad():
        layer.router.zero_()
    x = torch.randn(5, layer.in_features)
    qmoe.set_stage(model, "warmup")
    assert not layer.router.requires_grad
    warm = layer.delta(x, None)
    torch.testing.assert_close(warm, lora_reference(layer, x))
    qmoe.set_stage(model, "joint")
    assert layer.router.requires_grad
    torch.testing.assert_close(layer.delta(x, None), warm, rtol=1e-5, atol=1e-6)


def test_moelora_exactly_top_k_experts_per_token(tiny_4bit):
    model = qmoe.attach(tiny_4bit(), config("moelora", num_experts=8, top_k=3))
    layer = q_proj(model)
    _, probs, top_ids, gate = layer.route(torch.randn(50, layer.in_features))
    assert ((gate != 0).sum(-1) == 3).all()
    torch.testing.assert_close(gate.sum(-1), torch.ones(50))
    # the chosen experts are the most probable ones
    assert (gate.gather(1, top_ids) > 0).all()
    assert (probs.gather(1, top_ids).min(-1).values >= probs.masked_fill(gate > 0, -1).max(-1).values).all()


# ---------------------------------------------------------------------------------------------------------
# auxiliary losses


def test_balance_loss_minimum_at_uniform_routing():
    n, t = 8, 64
    uniform_probs = torch.full((t, n), 1 / n)
    uniform_ids = torch.arange(t * 2).view(t, 2) % n
    collapsed_probs = torch.zeros(t, n)
    collapsed_probs[:, 0] = 0.9
    collapsed_probs[:, 1:] = 0.1 / (n - 1)
    collapsed_ids = torch.tensor([[0, 1]]).repeat(t, 1)
    uniform = load_balancing_loss(uniform_probs, uniform_ids, n)
    collapsed = load_balancing_loss(collapsed_probs, collapsed_ids, n)
    assert uniform.item() == pytest.approx(1.0)
    assert collapsed.item() > 3.0
    # routing that concentrates probability and assignments grows the loss monotonically
    values = []
    for sharpness in (0.0, 1.0, 3.0, 10.0):
        logits = torch.zeros(t, n)
        logits[:, 0] = sharpness
        probs = torch.softmax(logits + 0.01 * torch.randn(t, n), -1)
        values.append(load_balancing_loss(probs, probs.topk(2).indices, n).item())
    assert values == sorted(values) and values[0] == pytest.approx(1.0, abs=0.02)


def test_contrastive_loss_lower_for_separable_experts():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(8)
    centers = torch.eye(4, 16) * 5
    separable = centers[labels] + 0.1 * torch.randn(32, 16)
    identical = torch.ones(32, 16) + 0.1 * torch.randn(32, 16)
    sep = expert_contrastive_loss(separable, labels, separable.detach(), labels, 0.07, self_columns=torch.arange(32))
    same = expert_contrastive_loss(identical, labels, identical.detach(), labels, 0.07, self_columns=torch.arange(32))
    assert sep.item() < 0.05
    assert same.item() > 1.0


def test_moelora_aux_losses_and_bounded_queue(tiny_4bit):
    cfg = config("moelora", contrastive_queue_size=5, contrastive_samples=6)
    model = qmoe.attach(tiny_4bit(), cfg)
    randomize_b(model)
    model.train()
    ids, mask = batch()
    for _ in range(6):
        model(input_ids=ids, attention_mask=mask)
    parts = qmoe.aux_loss_parts(model)
    assert set(parts) == {"balance", "contrastive"}
    assert parts["balance"].item() >= 1.0 - 1e-6 and parts["contrastive"].item() > 0
    total = qmoe.aux_loss(model)
    expected = cfg.balance_loss_weight * parts["balance"] + cfg.contrastive_loss_weight * parts["contrastive"]
    torch.testing.assert_close(total, expected)
    layer = q_proj(model)
    per_expert = torch.bincount(layer.queue_labels, minlength=cfg.num_experts)
    assert per_expert.max().item() <= 5  # memory does not grow with steps
    assert layer.queue.shape[0] == layer.queue_labels.shape[0] <= 5 * cfg.num_experts


@pytest.mark.parametrize("method", ["lora", "loramoe", "loracoe"])
def test_aux_loss_zero_without_auxiliary_losses(tiny_4bit, method):
    model = qmoe.attach(tiny_4bit(), config(method))
    model.train()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    assert qmoe.aux_loss(model).item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# training behaviour on 4-bit backbones


def _loss_and_grads(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    loss = out.loss + qmoe.aux_loss(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_identical_loss_and_grads(tiny_4bit, method):
    ids, mask = batch()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = qmoe.attach(tiny_4bit(), config(method))
        randomize_b(model)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # two steps so MoELoRA's contrastive queue is non-empty on the second one
        _loss_and_grads(model, ids, mask)
        results.append(_loss_and_grads(model, ids, mask))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_params_train_and_base_stays_bit_identical(tiny_4bit, method):
    model = qmoe.attach(tiny_4bit(), config(method))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_names = {
        f"{ln}.{pn}" for ln, layer in qmoe.adapter_layers(model).items() for pn in layer.adapter_param_names
    }
    assert trainable == adapter_names
    assert qmoe.trainable_parameters(model) == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids, mask = batch()
    (model(input_ids=ids, attention_mask=mask, labels=ids).loss + qmoe.aux_loss(model)).backward()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, n
    opt.step()
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p.detach(), before[n]), n
    # the 4-bit layers are really 4-bit
    assert isinstance(q_proj(model).base_layer, bnb.nn.Linear4bit)


@pytest.mark.parametrize("method", METHODS)
def test_twenty_adamw_steps_lower_the_lm_loss(tiny_4bit, method):
    torch.manual_seed(0)
    model = qmoe.attach(tiny_4bit(), config(method, dropout=0.05))
    if method == "loracoe":
        qmoe.set_stage(model, "joint")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids, mask = batch()
    losses = []
    for _ in range(20):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        (out.loss + qmoe.aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize(
    "quant,dtype", [("nf4", torch.float32), ("fp4", torch.float32), ("nf4", torch.bfloat16), ("none", torch.float32)]
)
@pytest.mark.parametrize("method", ["moelora", "loracoe"])
def test_backbones_and_adapter_dtype(tiny_4bit, quant, dtype, method):
    model = qmoe.attach(tiny_4bit(quantization=quant, compute_dtype=dtype), config(method))
    layer = q_proj(model)
    if quant == "none":
        assert type(layer.base_layer) is torch.nn.Linear
    else:
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert layer.base_layer.weight.quant_type == quant
    for name in layer.adapter_param_names:
        assert getattr(layer, name).dtype == dtype
    model.train()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    (out.loss + qmoe.aux_loss(model)).backward()
    assert torch.isfinite(out.loss)
    assert layer.lora_A.grad is not None and torch.isfinite(layer.lora_A.grad.float()).all()


# ---------------------------------------------------------------------------------------------------------
# telemetry


def test_routing_counts_exclude_padding(tiny_4bit):
    model = qmoe.attach(tiny_4bit(), config("moelora", top_k=2))
    ids, mask = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    info = qmoe.routing(model)["model.layers.0.mlp.down_proj"]
    assert info["tokens"] == int(mask.sum()) == 19
    assert sum(info["counts"]) == 19 * 2
    assert sum(info["load"]) == pytest.approx(1.0)
    loads = qmoe.expert_load(model)
    assert len(loads) == 14 and all(len(v) == 8 for v in loads.values())


def test_routing_counts_are_off_the_autograd_graph(tiny_4bit):
    model = qmoe.attach(tiny_4bit(), config("loramoe"))
    model.train()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask, labels=ids)
    layer = q_proj(model)
    assert not layer.last_load.requires_grad and layer.last_load.grad_fn is None
    assert layer.last_counts.sum().item() == int(mask.sum())


@pytest.mark.parametrize("method,width", [("moelora", 8), ("loracoe", 16), ("loramoe", 4)])
def test_trace_records_per_token_routing_during_generation(tiny_4bit, method, width):
    model = qmoe.attach(tiny_4bit(), config(method))
    model.eval()
    ids = torch.randint(0, 256, (1, 6))
    with qmoe.trace_routing(model), torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    name = "model.layers.1.self_attn.v_proj"
    trace = qmoe.routing(model)[name]["trace"]
    weights = torch.cat(trace)
    # the prompt forward plus one forward per further generated token
    assert weights.shape == (6 + gen.shape[1] - 6 - 1, width)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))
    per_token = qmoe.token_routing(model, name, top=2)
    assert len(per_token) == weights.shape[0] and len(per_token[0]) == 2
    if method == "moelora":
        assert ((weights > 0).sum(-1) == 2).all()
    # tracing off: nothing recorded
    qmoe.set_tracing(model, False)
    with torch.no_grad():
        model(input_ids=ids)
    assert qmoe.routing(model)[name]["trace"] == []


# ---------------------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_into_fresh_4bit_model_gives_identical_logits(tiny_4bit, tmp_path, method):
    model = qmoe.attach(tiny_4bit(), config(method))
    randomize_b(model)
    model.eval()
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    qmoe.save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in files and "adapter.safetensors" in files
    # only adapter tensors: the file is small compared with the model
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "router") for k in keys)
    assert len(keys) == 14 * len(q_proj(model).adapter_param_names)
    fresh = qmoe.load_adapter(tiny_4bit(), tmp_path / "adapter")
    assert qmoe.adapter_config(fresh).method == method
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


def test_lora_adapter_loads_in_peft_with_identical_logits(tiny_4bit, tmp_path):
    from peft import PeftModel

    model = qmoe.attach(tiny_4bit(), config("lora", r=8, alpha=16))
    randomize_b(model)
    model.eval()
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    qmoe.save_adapter(model, tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(tiny_4bit(), str(tmp_path / "lora"))
    peft_model.eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _peft_lora_folder(tiny_4bit, tmp_path, r=16, alpha=16):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        tiny_4bit(),
        LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    return peft_model, tmp_path / "peft"


def test_peft_lora_folder_warm_starts_loracoe(tiny_4bit, tmp_path):
    peft_model, folder = _peft_lora_folder(tiny_4bit, tmp_path)
    ids, mask = batch()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    cfg = config("loracoe", r=16, alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])
    model = qmoe.load_adapter(tiny_4bit(), folder, config=cfg)
    model.eval()
    layer = q_proj(model)
    assert layer.router.abs().sum() == 0  # router untrained, LoRA part from PEFT
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    # uniform composition of the upcycled LoRA (alpha rescaled) reproduces the PEFT model exactly
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and a bare model attaches the PEFT folder as plain lora
    plain = qmoe.load_adapter(tiny_4bit(), folder)
    assert qmoe.adapter_config(plain).method == "lora"


def test_corrupt_or_mismatched_adapter_names_the_file(tiny_4bit, tmp_path):
    model = qmoe.attach(tiny_4bit(), config("moelora"))
    qmoe.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(qmoe.AdapterError, match="adapter.safetensors"):
        qmoe.load_adapter(tiny_4bit(), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["r"] = 8
    qmoe.save_adapter(model, tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(qmoe.AdapterError, match=r"layer model\.layers\.0\..*shape"):
        qmoe.load_adapter(tiny_4bit(), tmp_path / "b")


# ---------------------------------------------------------------------------------------------------------
# bad configs


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(method="moe"), "method"),
        (dict(method="moelora", num_experts=4, top_k=5), "top_k"),
        (dict(method="moelora", top_k=0), "top_k"),
        (dict(method="lora", r=0), "r"),
        (dict(method="lora", r=-3), "r"),
        (dict(method="loramoe", r=10, num_experts=4), "r"),
        (dict(method="lora", dropout=1.5), "dropout"),
        (dict(method="moelora", contrastive_temperature=0), "contrastive_temperature"),
        (dict(method="moelora", contrastive_temperature=0.01), "contrastive_temperature"),
        (dict(method="lora", rank=4), "rank"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        qmoe.AdapterConfig(**kwargs)


def test_target_pattern_matching_nothing_is_named(tiny_4bit):
    with pytest.raises(ValueError, match=r"target_modules.*qkv_proj.*valid names.*q_proj"):
        qmoe.attach(tiny_4bit(), config("lora", target_modules=["q_proj", "qkv_proj"]))


def test_target_modules_all_linear_and_regex(tiny_4bit):
    model = qmoe.attach(tiny_4bit(), config("lora", target_modules="all-linear"))
    assert len(qmoe.adapter_layers(model)) == 14 and "lm_head" not in qmoe.adapter_layers(model)
    model = qmoe.attach(tiny_4bit(), config("lora", target_modules=r"model\.layers\.1\..*_proj"))
    assert len(qmoe.adapter_layers(model)) == 7


def test_paper_defaults():
    moe = qmoe.AdapterConfig(method="moelora")
    assert (moe.num_experts, moe.r, moe.top_k) == (8, 4, 2)
    coe = qmoe.AdapterConfig(method="loracoe")
    assert (coe.num_experts, coe.r, coe.alpha) == (2, 16, 32)
    lm = qmoe.AdapterConfig(method="loramoe")
    assert (lm.num_experts, lm.r) == (4, 16)
