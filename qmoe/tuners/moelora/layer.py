"""MoELoRA (arXiv 2402.12851): N LoRA experts of rank r, a linear top-k router with renormalised weights,
a load-balancing loss and a contrastive loss between expert outputs.

Batched, no loop over experts: x is multiplied once by [router; A_1..A_N] (router logits and every
expert's rank activations from one matmul); the sparse top-k gate is expanded over each expert's r ranks
and applied in rank space; one matmul with [B_1..B_N] gives the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels import moelora_fused
from ..base import AdapterLayer, in_recomputation
from .losses import expert_contrastive_loss, load_balancing_loss

_MIN_NORM = 1e-6  # expert outputs below this are still ~zero (B starts at 0): no direction to contrast yet


class MoELoraLayer(AdapterLayer):
    adapter_param_names = ("lora_A", "lora_B", "router")
    routed = True

    def __init__(self, base_layer, config, context):
        super().__init__(base_layer, config, context)
        n, r = config.num_experts, config.r
        self.lora_A = self._new_param(n * r, self.in_features)  # expert i owns rows i*r:(i+1)*r
        self.lora_B = self._new_param(self.out_features, n * r)  # and columns i*r:(i+1)*r
        self.router = self._new_param(n, self.in_features)
        self._kaiming_(self.lora_A)
        self._kaiming_(self.router)
        if not config.init_lora_weights:
            self._kaiming_(self.lora_B)
        # contrastive queues: recent detached expert outputs and their expert ids (bounded ring buffer)
        self.queue: torch.Tensor | None = None
        self.queue_labels: torch.Tensor | None = None
        self._queue_used: tuple | None = None  # snapshot the forward used, replayed under checkpointing

    # -- routing ------------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor):
        """Rank activations h [T, N*r], router probabilities [T, N], top ids [T, k], gate [T, N]."""
        n, k = self.config.num_experts, self.config.top_k
        z = F.linear(x, torch.cat([self.router, self.lora_A], 0))
        logits, h = z[:, :n], z[:, n:]
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_ids = probs.topk(k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        gate = torch.zeros_like(probs).scatter(1, top_ids, top_w).to(x.dtype)
        return h, probs, top_ids, gate

    def delta(self, x, valid):
        r = self.config.r
        fused = moelora_fused(self, x)  # Triton on CUDA (see qmoe.kernels); None: this PyTorch path
        if fused is not None:
            gated, h, probs, top_ids, gate = fused
        else:
            h, probs, top_ids, gate = self.route(x)
            gated = h * gate.repeat_interleave(r, dim=-1)
        out = F.linear(gated, self.lora_B) * self.scale
        self._telemetry(gate, top_ids, valid)
        if self.training and torch.is_grad_enabled():
            self._aux_losses(h, probs, top_ids, valid)
        return out

    # -- auxiliary losses ---------------------------------------------------------------------------------
    def _aux_losses(self, h, probs, top_ids, valid) -> None:
        c = self.config
        p, ids, hv = (probs, top_ids, h) if valid is None else (probs[valid], top_ids[valid], h[valid])
        balance = load_balancing_loss(p, ids, c.num_experts)
        contrastive = self._contrastive(hv, ids)
        self._set_aux(balance=balance, contrastive=contrastive)

    def expert_outputs(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """B_e A_e x for each (token, chosen expert e): h [S, N*r], ids [S, k] -> [S*k, out].

        Masks each token's rank activations to one expert's block and uses the shared B matmul, so no
        per-expert weights are gathered (memory stays S*k*out).
        """
        n, r = self.config.num_experts, self.config.r
        s, k = ids.shape
        onehot = F.one_hot(ids.reshape(-1), n).to(h.dtype)  # [S*k, N]
        masked = h.repeat_interleave(k, dim=0) * onehot.repeat_interleave(r, dim=-1)
        return F.linear(masked, self.lora_B)

    def _contrastive(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.contrastive_loss_weight == 0 or h.shape[0] == 0:
            return h.sum() * 0.0
        # evenly spaced anchor tokens: deterministic (no RNG draw, so resumed runs match) and bounded
        count = min(c.contrastive_samples, h.shape[0])
        pick = torch.linspace(0, h.shape[0] - 1, count, device=h.device).round().long()
        outputs = self.expert_outputs(h[pick], ids[pick])
        labels = ids[pick].reshape(-1)
        keep = outputs.detach().norm(dim=-1) > _MIN_NORM
        outputs, labels = outputs[keep], labels[keep]
        if in_recomputation() and self._queue_used is not None:
            queue, queue_labels = self._queue_used
        else:
            queue, queue_labels = self.queue, self.queue_labels
            self._queue_used = (queue, queue_labels)
        # keys: the queue plus this step's outputs (detached), so the loss has signal from the first step
        keys, key_labels = outputs.detach(), labels
        offset = 0
        if queue is not None:
            keys, key_labels = torch.cat([queue.to(keys.dtype), keys]), torch.cat([queue_labels, labels])
            offset = queue.shape[0]
        self_columns = torch.arange(outputs.shape[0], device=outputs.device) + offset
        loss = expert_contrastive_loss(outputs, labels, keys, key_labels, c.contrastive_temperature, self_columns)
        if not in_recomputation():
            self._enqueue(outputs.detach(), labels)
        return loss

    def _enqueue(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Append to each expert's queue, keeping the newest ``contrastive_queue_size`` per expert."""
        c = self.config
        if self.queue is not None:
            outputs = torch.cat([self.queue, outputs.to(self.queue.dtype)])
            labels = torch.cat([self.queue_labels, labels])
        # rank of each entry among the newer entries of the same expert; keep the newest per expert
        newest_first = torch.arange(labels.shape[0] - 1, -1, -1, device=labels.device)
        lab = labels[newest_first]
        onehot = F.one_hot(lab, c.num_experts)
        order = (onehot.cumsum(0) * onehot).sum(1)  # 1 = newest of its expert
        keep = newest_first[order <= c.contrastive_queue_size].flip(0)
        self.queue, self.queue_labels = outputs[keep].contiguous(), labels[keep].contiguous()

    # -- telemetry ----------------------------------------------------------------------------------------
    def _telemetry(self, gate, top_ids, valid) -> None:
        with torch.no_grad():
            n = self.config.num_experts
            ids = top_ids if valid is None else top_ids[valid]
            counts = torch.bincount(ids.reshape(-1), minlength=n)
            total = counts.sum()
            load = counts.float() / total if total > 0 else torch.full((n,), 1.0 / n, device=counts.device)
            self._record(counts, load, ids.shape[0])
            if self.context.trace and not torch.is_grad_enabled():
                self.trace_records.append({"weights": gate.float().cpu()})
