"""Partition-based LoRAMoE (LoRACoE paper §2.3, eq. 4-5): the rank-r LoRA split into N experts of rank r/N,
mixed by a dense softmax gate: delta = (alpha/r) * sum_i g_i(x) B_i A_i x.

Batched: the experts' A are the rows of one [r, in] matrix and their B the columns of one [out, r] matrix,
so the gate is applied in rank space (each expert's gate repeated over its r/N ranks) between two matmuls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdapterContext, AdapterLayer

if TYPE_CHECKING:  # (qmoe.config imports the tuners' defaults)
    from ...config import AdapterConfig


class LoraMoELayer(AdapterLayer):
    adapter_param_names = ("lora_A", "lora_B", "router")
    routed = True

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, context: AdapterContext):
        super().__init__(base_layer, config, context)
        self.lora_A = self._new_param(config.r, self.in_features)
        self.lora_B = self._new_param(self.out_features, config.r)
        self.router = self._new_param(config.num_experts, self.in_features)
        self._kaiming_(self.lora_A)
        self._kaiming_(self.router)
        if not config.init_lora_weights:
            self._kaiming_(self.lora_B)

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank activations A x [T, r], gate probabilities [T, N]) from one matmul of x with [A; router]."""
        r = self.config.r
        z = F.linear(x, torch.cat([self.lora_A, self.router], 0))
        return z[:, :r], torch.softmax(z[:, r:].float(), dim=-1).to(x.dtype)

    def delta(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        n, r = self.config.num_experts, self.config.r
        h, probs = self.gate(x)
        self.record_routing(probs, valid)  # dense gate: a token counts for its most weighted expert
        gated = h * probs.repeat_interleave(r // n, dim=-1)
        return F.linear(gated, self.lora_B) * self.scale

    # -- inference fast path (AdapterLayer.forward) ------------------------------------------------------
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.lora_A, self.router], 0).detach(), self.lora_B.detach() * self.scale

    def decoder_spec(self) -> tuple[str, int, int, int]:
        return "loramoe", self.config.num_experts, self.config.r, 0

    def inference_step(self, out, flat, up_t, down_t):
        n, r = self.config.num_experts, self.config.r
        z = torch.mm(flat, up_t)
        probs = torch.softmax(z[:, r:].float(), dim=-1).to(z.dtype)
        out.addmm_((z[:, :r].view(-1, n, r // n) * probs.unsqueeze(2)).view(-1, r), down_t)
        return probs, None
