"""LoRACoE (LoRA Composition of Experts, §3): experts are input-dependent weightings of the LoRA's ranks.

    G_i(x) = softmax_j(W_route_i x)            (E experts, each a distribution over the r ranks)
    delta  = s * (1/E) sum_i sum_j G_ij B_j A_j x  =  s * B( mean_i G_i(x) * A x )

A and the router come from ONE matmul of x against [A; W_route] (App. C.2.1), the softmax runs per expert
over the ranks and the average over experts (C.2.2) gives one weight per rank, applied in rank space
before the B matmul. Stage ``warmup`` is plain LoRA (router unused and frozen); stage ``joint`` trains both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import backend_for, loracoe_routing
from ..base import AdapterContext, AdapterLayer

if TYPE_CHECKING:  # (qmoe.config imports the tuners' defaults)
    from ...config import AdapterConfig


class LoraCoELayer(AdapterLayer):
    adapter_param_names = ("lora_A", "lora_B", "router")
    routed = True

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, context: AdapterContext):
        super().__init__(base_layer, config, context)
        e, r = config.num_experts, config.r
        self.lora_A = self._new_param(r, self.in_features)
        self.lora_B = self._new_param(self.out_features, r)
        # zero router: uniform composition, so joint training starts exactly at the warmed-up LoRA
        self.router = self._new_param(e * r, self.in_features)
        self._kaiming_(self.lora_A)
        if not config.init_lora_weights:
            self._kaiming_(self.lora_B)
        # 'rank': weights sum to r (uniform = LoRA); 'paper': weights sum to 1 (the literal formula)
        self.composition_factor = float(r) if config.composition_scale == "rank" else 1.0
        self.stage = config.stage
        self._inference_backend = "torch"  # what the fast path's composition runs on (set with its weights)

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self._drop_inference_cache()  # the fast path's weights and routing differ by stage
        self.router.requires_grad_(stage == "joint")

    def delta(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if self.stage == "warmup":
            return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        z = F.linear(x, torch.cat([self.lora_A, self.router], 0))
        # the composition (qmoe.kernels.loracoe_gate_reference, fused on CUDA): gated ranks and rank weights
        gated, weights = loracoe_routing(z, self.config.num_experts, self.config.r, self.composition_factor)
        self.record_routing(weights, valid)  # the "experts" of LoRACoE's telemetry are its r ranks
        return F.linear(gated, self.lora_B) * self.scale

    # -- inference fast path (AdapterLayer.forward) ------------------------------------------------------
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stage == "warmup":
            return super().fused_weights()
        self._inference_backend = backend_for(self.lora_A, "loracoe", (self.config.num_experts, self.config.r))
        # the composition factor is a constant: folded into down once instead of multiplied per token
        up = torch.cat([self.lora_A, self.router], 0).detach()
        return up, self.lora_B.detach() * (self.scale * self.composition_factor)

    def decoder_spec(self) -> tuple[str, int, int, int]:
        if self.stage == "warmup":
            return super().decoder_spec()
        return "loracoe", self.config.num_experts, self.config.r, 0

    def inference_step(self, out, flat, up_t, down_t):
        if self.stage == "warmup":
            return super().inference_step(out, flat, up_t, down_t)
        e, r = self.config.num_experts, self.config.r
        z = torch.mm(flat, up_t)
        # one fused kernel instead of the ops below (CUDA decode); under torch.compile the ops, which it fuses itself
        if self._inference_backend == "triton" and not torch.compiler.is_compiling():
            from ...kernels.triton_kernels import loracoe_forward

            gated, weights = loracoe_forward(z, e, r, 1.0)
        else:
            weights = torch.softmax(z[:, r:].view(-1, e, r).float(), dim=-1).mean(1)
            gated = z[:, :r] * weights.to(z.dtype)
        out.addmm_(gated, down_t)
        return weights, None
