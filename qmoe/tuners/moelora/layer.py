"""MoELoRA (arXiv 2402.12851): N LoRA experts of rank r, a linear top-k router with renormalised weights,
a load-balancing loss and a contrastive loss between expert outputs.

Batched, no loop over experts: x is multiplied once by [router; A_1..A_N] (router logits and every
expert's rank activations from one matmul); the sparse top-k gate is expanded over each expert's r ranks
and applied in rank space; one matmul with [B_1..B_N] gives the output. The contrastive loss works in rank
space too (see losses.py): its queues hold r numbers and an expert id per entry, whatever out_features is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...kernels import backend_for, moelora_routing
from ..base import AdapterContext, AdapterLayer, in_recomputation
from .losses import (
    balance_counts,
    gram,
    load_balancing_loss,
    rank_space_contrastive_loss,
    rank_space_sq_norms,
    stack_ranks,
)

if TYPE_CHECKING:  # (qmoe.config imports the tuners' defaults)
    from ...config import AdapterConfig

_MIN_NORM = 1e-6  # expert outputs below this are still ~zero (B starts at 0): no direction to contrast yet

# checkpoint tensor names of the contrastive queues (per layer); "queue" held output vectors before 0.2
QUEUE_TENSORS = ("queue_ranks", "queue_labels")
OLD_QUEUE_TENSOR = "queue"


class QueueFormatError(ValueError):
    """Saved contrastive queues in a format this version cannot use."""


class MoELoraLayer(AdapterLayer):
    adapter_param_names = ("lora_A", "lora_B", "router")
    routed = True

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, context: AdapterContext):
        super().__init__(base_layer, config, context)
        n, r = config.num_experts, config.r
        self.lora_A = self._new_param(n * r, self.in_features)  # expert i owns rows i*r:(i+1)*r
        self.lora_B = self._new_param(self.out_features, n * r)  # and columns i*r:(i+1)*r
        self.router = self._new_param(n, self.in_features)
        self._kaiming_(self.lora_A)
        self._kaiming_(self.router)
        if not config.init_lora_weights:
            self._kaiming_(self.lora_B)
        # contrastive queues (bounded ring buffer per expert): the rank vectors A_e x [Q, r] of recent anchors
        # and their expert ids [Q]; a key is the expert's *current* B applied to its queued rank vector
        self.queue: torch.Tensor | None = None
        self.queue_labels: torch.Tensor | None = None
        self._queue_used: tuple | None = None  # snapshot the forward used, replayed under checkpointing
        self._inference_backend = "torch"  # what the fast path's routing runs on (set with its fused weights)
        self._collected: dict[str, object] = {}  # data parallel: collective results, replayed likewise

    # -- routing ------------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z = x @ [router; A]^T [T, N(r+1)], router probabilities [T, N], top ids [T, k], gate [T, N]).

        One matmul, then the routing of qmoe.kernels (the plain reference, or its fused version on CUDA)."""
        c = self.config
        z = F.linear(x, torch.cat([self.router, self.lora_A], 0))
        _, probs, top_ids, gate = moelora_routing(z, c.num_experts, c.r, c.top_k)
        return z, probs, top_ids, gate

    def delta(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        z = F.linear(x, torch.cat([self.router, self.lora_A], 0))
        gated, probs, top_ids, gate = moelora_routing(z, c.num_experts, c.r, c.top_k)
        out = F.linear(gated, self.lora_B) * self.scale
        self.record_routing(gate, valid, chosen=top_ids)
        if self.training and torch.is_grad_enabled():
            self._aux_losses(z, probs, top_ids, valid)
        return out

    # -- inference fast path (AdapterLayer.forward) ------------------------------------------------------
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        self._inference_backend = backend_for(self.lora_A, "moelora", (c.num_experts, c.r, c.top_k))
        return torch.cat([self.router, self.lora_A], 0).detach(), self.lora_B.detach() * self.scale

    def decoder_spec(self) -> tuple[str, int, int, int]:
        c = self.config
        return "moelora", c.num_experts, c.r, c.top_k

    def inference_step(self, out, flat, up_t, down_t):
        c = self.config
        n, r = c.num_experts, c.r
        z = torch.mm(flat, up_t)
        # one fused kernel instead of the ops below (CUDA decode); under torch.compile the ops, which it fuses itself
        if self._inference_backend == "triton" and not torch.compiler.is_compiling():
            from ...kernels.triton_kernels import moelora_forward

            gated, _, top_ids, gate = moelora_forward(z, n, r, c.top_k)
        else:
            # the renormalised top-k of softmax(logits) is the softmax of the top-k logits (same ids: monotone)
            top_logits, top_ids = z[:, :n].float().topk(c.top_k, dim=-1)
            gate = z.new_zeros(z.shape[0], n, dtype=torch.float32).scatter_(1, top_ids, top_logits.softmax(-1))
            gated = (z[:, n:].view(-1, n, r) * gate.to(z.dtype).unsqueeze(2)).view(-1, n * r)
        out.addmm_(gated, down_t)
        return gate, top_ids

    # Compiled decode (qmoe chat --compile): the router first, then only the chosen experts' rows of A and B, as qmoe's
    # CPU kernel reads them. The eager step's one matmul over [router; A] reads every expert's weights, which at
    # decode is most of the adapter's cost (memory traffic: 8 experts, 2 chosen by default).
    def compiled_weights(self, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return up.contiguous(), down.t().contiguous()  # rows per expert in both: [router; A] and (s B)^T

    def compiled_step(self, out, flat, up, down_t):
        c = self.config
        n, r, k = c.num_experts, c.r, c.top_k
        if flat.shape[0] * k >= n:  # as many choices as experts (a batch): reading them all costs no more
            return self.inference_step(out, flat, up.t(), down_t)
        top_logits, top_ids = F.linear(flat, up[:n]).float().topk(k, dim=-1)
        gate = top_logits.softmax(-1).to(flat.dtype)  # (the renormalised top-k of the softmax, as inference_step)
        a = up[n:].view(n, r, -1)[top_ids]  # [T, k, r, in]: the chosen experts' rows, gathered in the graph
        ranks = (a * flat[:, None, None, :]).sum(-1) * gate.unsqueeze(-1)  # [T, k, r]
        out += (down_t.view(n, r, -1)[top_ids] * ranks.unsqueeze(-1)).sum((1, 2))
        return None, top_ids  # (no routing telemetry under compile: forward_compiled drops it)

    # -- auxiliary losses ---------------------------------------------------------------------------------
    def _aux_losses(self, z, probs, top_ids, valid) -> None:
        c = self.config
        rows = None if valid is None else valid.nonzero().squeeze(1)
        p, ids = (probs, top_ids) if rows is None else (probs[rows], top_ids[rows])
        span = None
        if distributed.world_size() > 1:
            # data parallel: every process's expert counts and token count; their sum gives the global batch's
            # f (see load_balancing_loss), the tokens before this process's place it in the global batch
            # (the processes' micro-batches, concatenated in rank order, are the global one)
            each = self._collective("balance", lambda: distributed.all_gather_equal(balance_counts(ids, c.num_experts)))
            totals = each.sum(0)
            balance = load_balancing_loss(p, ids, c.num_experts, totals, distributed.world_size())
            span = (int(each[: distributed.rank(), -1].sum()), int(totals[-1]))
        else:
            balance = load_balancing_loss(p, ids, c.num_experts)
        # (a single process calls it as before: tests swap in an output-space reference of that signature)
        contrastive = self._contrastive(z, ids, rows) if span is None else self._contrastive(z, ids, rows, span)
        self._set_aux(balance=balance, contrastive=contrastive)

    def _contrastive(
        self, z: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor | None, span: tuple[int, int] | None = None
    ) -> torch.Tensor | Callable[[], torch.Tensor]:
        """The contrastive loss of this forward, deferred: selects anchors and keys and updates the queues now
        (cheap, replayed identically when gradient checkpointing recomputes the forward), and returns a
        callable that computes the loss when :meth:`aux_losses` first asks, outside the recomputed region.

        z [T, N(r+1)]: router logits then every expert's rank activations; ids [V, k]: the chosen experts of
        the V non-padding tokens, at positions ``rows`` of z (None: all T tokens).

        Data parallel, ``span`` = (tokens of the global batch before this process's, tokens of the global
        batch): the anchors are those one process would pick from the global batch, the keys every process's
        anchors (all-gathered, so the queues are the same everywhere) and this process's loss is weighted by
        its share of the anchors, so that the mean over processes is the loss of the global batch."""
        c = self.config
        n, r = c.num_experts, c.r
        parallel = span is not None
        # (data parallel: a process without tokens still takes part in the gather below)
        if c.contrastive_loss_weight == 0 or (ids.shape[0] == 0 and not parallel):
            return z.sum() * 0.0
        # evenly spaced anchor tokens: deterministic (no RNG draw, so resumed runs match) and bounded
        if parallel:  # this process's part of the anchors evenly spaced over the global batch
            first, everyone = span
            pick = _evenly_spaced(everyone, c.contrastive_samples, z.device)
            pick = pick[(pick >= first) & (pick < first + ids.shape[0])] - first
        else:
            pick = _evenly_spaced(ids.shape[0], c.contrastive_samples, z.device)
        chosen = ids[pick]  # [S, k]
        tokens = pick if rows is None else rows[pick]
        # each (token, chosen expert e)'s rank vector A_e x, read from z in one indexing op: [S*k, r]
        columns = n + chosen[:, :, None] * r + _arange(r, z.device)
        ranks, labels = z[tokens[:, None, None], columns].reshape(-1, r), chosen.reshape(-1)
        anchors = stack_ranks(ranks, labels, n)
        layer_gram = gram(self.lora_B)
        keep = rank_space_sq_norms(anchors.detach(), layer_gram) > _MIN_NORM**2
        # (meta tensors, qmoe.plan: every anchor kept, the most the loss can hold)
        if keep.device.type != "meta" and not bool(keep.all()):
            ranks, labels, anchors = ranks[keep], labels[keep], anchors[keep]
        queue, queue_labels = self.queue_for_this_forward()
        # this step's anchors (detached) of every process, and where this process's own begin among them:
        # data parallel, they are all-gathered so each process's anchors see every process's keys and the
        # queues stay identical on all processes (a few hundred numbers per layer per step)
        step_ranks, step_labels, mine = ranks.detach(), labels, 0
        if parallel:
            step_ranks, step_labels, mine = self._collective(
                "contrastive", lambda: _gather_entries(ranks.detach(), labels, c.contrastive_samples * c.top_k)
            )
        # keys: the queue plus this step's anchors, so the loss has signal from the first step
        key_ranks, key_labels = step_ranks, step_labels
        offset = mine
        if queue is not None:
            key_ranks = torch.cat([queue.to(ranks.dtype), key_ranks])
            key_labels = torch.cat([queue_labels, step_labels])
            offset = queue.shape[0] + mine
        keys = stack_ranks(key_ranks, key_labels, n)
        self_columns = _arange(anchors.shape[0], z.device) + offset
        if not in_recomputation():
            self._enqueue(step_ranks, step_labels)
        loss = functools.partial(
            rank_space_contrastive_loss,
            anchors,
            labels,
            keys,
            key_labels,
            self.lora_B,
            n,
            c.contrastive_temperature,
            self_columns,
            layer_gram,
        )
        if not parallel:
            return loss
        # anchors with a positive key (the keys are the same on every process): the loss averages over them
        has_pos = torch.bincount(key_labels, minlength=n)[step_labels] > 1
        weight = (
            int(has_pos[mine : mine + anchors.shape[0]].sum()) * distributed.world_size() / max(int(has_pos.sum()), 1)
        )
        return lambda: loss() * weight

    def _collective(self, name: str, run: Callable[[], object]) -> object:
        """``run()`` (a collective) in the original forward; under gradient checkpointing's recomputation its
        result is replayed: the recomputed graph must equal the original, and no process may run an extra
        collective its peers do not."""
        if not (in_recomputation() and name in self._collected):
            self._collected[name] = run()
        return self._collected[name]

    def queue_for_this_forward(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The queues this forward's keys come from: the current ones, or under gradient checkpointing's
        recomputation the same snapshot the original forward used (it has enqueued since)."""
        if not (in_recomputation() and self._queue_used is not None):
            self._queue_used = (self.queue, self.queue_labels)
        return self._queue_used

    def _enqueue(self, ranks: torch.Tensor, labels: torch.Tensor) -> None:
        """Append to each expert's queue, keeping the newest ``contrastive_queue_size`` per expert."""
        c = self.config
        if ranks.device.type == "meta":  # qmoe.plan's shape-only forward: the queues as they stay once full
            self.queue = ranks.new_empty(c.num_experts * c.contrastive_queue_size, c.r)
            self.queue_labels = labels.new_empty(c.num_experts * c.contrastive_queue_size)
            return
        if self.queue is not None:
            ranks = torch.cat([self.queue, ranks.to(self.queue.dtype)])
            labels = torch.cat([self.queue_labels, labels])
        # rank of each entry among the newer entries of the same expert; keep the newest per expert
        newest_first = torch.arange(labels.shape[0] - 1, -1, -1, device=labels.device)
        lab = labels[newest_first]
        onehot = F.one_hot(lab, c.num_experts)
        order = (onehot.cumsum(0) * onehot).sum(1)  # 1 = newest of its expert
        keep = newest_first[order <= c.contrastive_queue_size].flip(0)
        self.queue, self.queue_labels = ranks[keep].contiguous(), labels[keep].contiguous()

    def contrastive_state_bytes(self) -> int:
        """Bytes of the contrastive state kept between steps: the queues and the snapshot of them that the
        last forward used (kept for gradient checkpointing's replay; after an enqueue it is a second copy).
        Storages are told apart by their identity, so meta tensors (qmoe.plan) count too."""
        seen = {}
        for value in (self.queue, self.queue_labels, *(self._queue_used or ())):
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[storage._cdata] = storage.nbytes()
        return sum(seen.values())

    # -- queue state (checkpoints) ------------------------------------------------------------------------
    def queue_state(self) -> dict[str, torch.Tensor]:
        """The contrastive queues as CPU tensors named by :data:`QUEUE_TENSORS` ({} while empty)."""
        if self.queue is None:
            return {}
        return dict(zip(QUEUE_TENSORS, (self.queue.detach().cpu(), self.queue_labels.detach().cpu()), strict=True))

    def load_queue_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`queue_state`; refuses queues saved in another format (raises QueueFormatError)."""
        if OLD_QUEUE_TENSOR in tensors:
            raise QueueFormatError("holds output-space contrastive queues (qmoe < 0.2), which cannot be converted")
        ranks, labels = (tensors[name] for name in QUEUE_TENSORS)
        if ranks.dim() != 2 or ranks.shape[1] != self.config.r or labels.shape != ranks.shape[:1]:
            raise QueueFormatError(f"has queues of shape {tuple(ranks.shape)}, expected [entries, r={self.config.r}]")
        device = self.lora_A.device
        self.queue, self.queue_labels = ranks.to(device, self.lora_A.dtype), labels.to(device)


def _gather_entries(ranks: torch.Tensor, labels: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Queue entries (rank vectors [n, r], expert ids [n]) of every process in rank order, and the index of
    this process's first entry among them. One all_gather, the ids packed as a column (exact in fp32)."""
    packed = torch.cat([ranks.float(), labels[:, None].float()], 1)
    rows, counts = distributed.all_gather_rows(packed, max_rows)
    mine = int(counts[: distributed.rank()].sum())
    return rows[:, :-1].to(ranks.dtype), rows[:, -1].long(), mine


@functools.lru_cache(maxsize=64)
def _evenly_spaced(tokens: int, samples: int, device: torch.device) -> torch.Tensor:
    """``min(samples, tokens)`` evenly spaced positions in [0, tokens) (cached: the same few shapes recur)."""
    count = min(samples, tokens)
    return torch.linspace(0, tokens - 1, count, device=device).round().long()


@functools.lru_cache(maxsize=64)
def _arange(size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(size, device=device)
