"""MoELoRA's contrastive loss in rank space (issue 13): equal to the output-space reference, bounded state."""

import pytest
import torch
import torch.nn.functional as F

import qmoe
from qmoe.tuners.moelora.layer import QUEUE_TENSORS, MoELoraLayer, QueueFormatError
from qmoe.tuners.moelora.losses import (
    expert_contrastive_loss,
    rank_space_contrastive_loss,
    stack_ranks,
)
from qmoe.tuners.moelora.reference import moelora_contrastive_reference


def _rank_problem(n=4, r=3, out=40, anchors=10, keys=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora_b = (torch.randn(out, n * r, generator=g) * 0.2).requires_grad_()
    anchor_ranks = torch.randn(anchors, r, generator=g).requires_grad_()
    anchor_labels = torch.randint(0, n, (anchors,), generator=g)
    key_ranks = torch.randn(keys, r, generator=g)
    key_labels = torch.randint(0, n, (keys,), generator=g)
    return lora_b, anchor_ranks, anchor_labels, key_ranks, key_labels


@pytest.mark.parametrize("with_self", [False, True])
def test_rank_space_loss_and_gradients_equal_output_space(with_self):
    n = 4
    lora_b, a_ranks, a_labels, k_ranks, k_labels = _rank_problem(n=n)
    self_columns = None
    if with_self:  # the anchors' own detached copies as the last keys, as the layer does
        k_ranks = torch.cat([k_ranks, a_ranks.detach()])
        k_labels = torch.cat([k_labels, a_labels])
        self_columns = torch.arange(a_ranks.shape[0]) + 25
    anchors, keys = stack_ranks(a_ranks, a_labels, n), stack_ranks(k_ranks, k_labels, n)

    ours = rank_space_contrastive_loss(anchors, a_labels, keys, k_labels, lora_b, n, 0.07, self_columns)
    grads = torch.autograd.grad(ours, [a_ranks, lora_b], retain_graph=True)
    ref = expert_contrastive_loss(
        F.linear(anchors, lora_b), a_labels, F.linear(keys, lora_b.detach()), k_labels, 0.07, self_columns
    )
    ref_grads = torch.autograd.grad(ref, [a_ranks, lora_b])

    assert ours.item() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for got, want, name in zip(grads, ref_grads, ["anchor ranks", "B"], strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_rank_space_loss_bf16_matches_fp32_reference():
    n = 4
    lora_b, a_ranks, a_labels, k_ranks, k_labels = _rank_problem(n=n, seed=3)
    anchors, keys = stack_ranks(a_ranks, a_labels, n), stack_ranks(k_ranks, k_labels, n)
    ref = expert_contrastive_loss(F.linear(anchors, lora_b), a_labels, F.linear(keys, lora_b), k_labels, 0.07)
    b16 = lora_b.detach().bfloat16().requires_grad_()
    ours = rank_space_contrastive_loss(anchors.bfloat16(), a_labels, keys.bfloat16(), k_labels, b16, n, 0.07)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.detach(), rtol=2e-2, atol=2e-2)
    (grad_b,) = torch.autograd.grad(ours, b16)
    assert grad_b.dtype == torch.bfloat16 and torch.isfinite(grad_b.float()).all()


def _two_step_grads(tiny_4bit, contrastive, checkpointing, monkeypatch, pad):
    """Loss parts and adapter gradients of the second of two training forwards (queues filled by the first)."""
    from test_adapters import batch, config, randomize_b

    with monkeypatch.context() as patch:
        if contrastive is not None:
            patch.setattr(MoELoraLayer, "_contrastive", contrastive)
        torch.manual_seed(0)
        model = qmoe.attach(tiny_4bit(), config("moelora", contrastive_samples=8, contrastive_queue_size=6))
        randomize_b(model)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ids, mask = batch(pad_second=pad)
        for step in range(3):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
            parts = qmoe.aux_loss_parts(model)
            (out.loss + qmoe.aux_loss(model)).backward()
            if step < 2:
                model.zero_grad()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        queues = {n: layer.queue_state() for n, layer in qmoe.adapter_layers(model).items()}
        return {k: v.detach() for k, v in parts.items()}, grads, queues


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_layer_equals_output_space_reference_in_a_model(tiny_4bit, monkeypatch, checkpointing, pad):
    """Through a real 4-bit model: same contrastive loss, gradients (A, B, router) and queues as the
    output-space reference with fresh keys, with and without padding and gradient checkpointing."""
    parts, grads, queues = _two_step_grads(tiny_4bit, None, checkpointing, monkeypatch, pad)
    ref_parts, ref_grads, ref_queues = _two_step_grads(
        tiny_4bit, moelora_contrastive_reference, checkpointing, monkeypatch, pad
    )
    assert parts["contrastive"].item() > 0
    torch.testing.assert_close(parts["contrastive"], ref_parts["contrastive"], rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and any("router" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in queues:
        assert queues[name].keys() == set(QUEUE_TENSORS)
        for key in QUEUE_TENSORS:
            torch.testing.assert_close(queues[name][key], ref_queues[name][key], rtol=1e-6, atol=1e-7)


def test_queue_holds_rank_vectors_and_round_trips(tiny_4bit):
    from test_adapters import batch, config, q_proj, randomize_b

    cfg = config("moelora", contrastive_queue_size=4)
    model = qmoe.attach(tiny_4bit(), cfg)
    randomize_b(model)
    model.train()
    ids, mask = batch()
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask)
    layer = q_proj(model)
    state = layer.queue_state()
    assert state["queue_ranks"].shape[1] == cfg.r  # r numbers per entry, not out_features
    assert state["queue_ranks"].shape[0] == state["queue_labels"].shape[0] <= 4 * cfg.num_experts
    fresh = q_proj(qmoe.attach(tiny_4bit(), cfg))
    fresh.load_queue_state(state)
    torch.testing.assert_close(fresh.queue, layer.queue)
    assert torch.equal(fresh.queue_labels, layer.queue_labels)


def test_old_output_space_queues_are_refused(tiny_4bit):
    from test_adapters import config, q_proj

    layer = q_proj(qmoe.attach(tiny_4bit(), config("moelora")))
    old = {"queue": torch.randn(6, layer.out_features), "queue_labels": torch.zeros(6, dtype=torch.long)}
    with pytest.raises(QueueFormatError, match="output-space"):
        layer.load_queue_state(old)
    wrong = {"queue_ranks": torch.randn(6, layer.config.r + 1), "queue_labels": torch.zeros(6, dtype=torch.long)}
    with pytest.raises(QueueFormatError, match="expected"):
        layer.load_queue_state(wrong)


def test_checkpoint_queues_round_trip_and_old_format_is_refused(tiny_4bit, tmp_path):
    from safetensors.torch import save_file
    from test_adapters import batch, config, randomize_b

    from qmoe.checkpoints import QUEUES_FILE, CheckpointError, load_queues, save_queues

    cfg = config("moelora")
    model = qmoe.attach(tiny_4bit(), cfg)
    randomize_b(model)
    model.train()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    save_queues(model, tmp_path)
    fresh = qmoe.attach(tiny_4bit(), cfg)
    load_queues(fresh, tmp_path)
    for name, layer in qmoe.adapter_layers(model).items():
        torch.testing.assert_close(qmoe.adapter_layers(fresh)[name].queue, layer.queue)

    name, layer = next(iter(qmoe.adapter_layers(model).items()))
    save_file(
        {f"{name}.queue": torch.randn(4, layer.out_features), f"{name}.queue_labels": torch.zeros(4, dtype=torch.long)},
        str(tmp_path / QUEUES_FILE),
    )
    with pytest.raises(CheckpointError, match=rf"{QUEUES_FILE} holds output-space .*{name}.*delete this file"):
        load_queues(fresh, tmp_path)
