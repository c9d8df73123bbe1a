"""LoRACoE (LoRA Composition of Experts, §3): experts are input-dependent weightings of the LoRA's ranks.

    G_i(x) = softmax_j(W_route_i x)            (E experts, each a distribution over the r ranks)
    delta  = s * (1/E) sum_i sum_j G_ij B_j A_j x  =  s * B( mean_i G_i(x) * A x )

A and the router come from ONE matmul of x against [A; W_route] (App. C.2.1), the softmax runs per expert
over the ranks and the average over experts (C.2.2) gives one weight per rank, applied in rank space
before the B matmul. Stage ``warmup`` is plain LoRA (router unused and frozen); stage ``joint`` trains both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels import loracoe_fused
from ..base import AdapterLayer


class LoraCoELayer(AdapterLayer):
    adapter_param_names = ("lora_A", "lora_B", "router")
    routed = True

    def __init__(self, base_layer, config, context):
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

    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self.router.requires_grad_(stage == "joint")

    def rank_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A x [T, r], mean over experts of the per-expert softmax over ranks [T, r])."""
        e, r = self.config.num_experts, self.config.r
        z = F.linear(x, torch.cat([self.lora_A, self.router], 0))
        h, logits = z[:, :r], z[:, r:].reshape(-1, e, r)
        weights = torch.softmax(logits.float(), dim=-1).mean(1).to(x.dtype)
        return h, weights

    def delta(self, x, valid):
        if self.stage == "warmup":
            return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        fused = loracoe_fused(self, x)  # Triton on CUDA (see qmoe.kernels); None: this PyTorch path
        if fused is not None:
            gated, weights = fused
        else:
            h, weights = self.rank_weights(x)
            gated = h * weights * self.composition_factor
        self._telemetry(weights, valid)
        return F.linear(gated, self.lora_B) * self.scale

    def _telemetry(self, weights, valid) -> None:
        with torch.no_grad():
            w = weights if valid is None else weights[valid]
            r = self.config.r
            load = w.float().mean(0) if w.shape[0] else torch.full((r,), 1.0 / r, device=w.device)
            # counts: tokens whose most weighted rank is j (rank-level "expert" choice)
            counts = torch.bincount(w.argmax(-1), minlength=r) if w.shape[0] else torch.zeros(r, dtype=torch.long)
            self._record(counts, load, w.shape[0])
            if self.context.trace and not torch.is_grad_enabled():
                self.trace_records.append({"weights": weights.float().cpu()})
