"""Standard LoRA (Hu et al., 2021): delta = (alpha/r) * B A x, A random, B zero."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdapterContext, AdapterLayer

if TYPE_CHECKING:  # (qmoe.config imports the tuners' defaults)
    from ...config import AdapterConfig


class LoraLayer(AdapterLayer):
    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, context: AdapterContext):
        super().__init__(base_layer, config, context)
        self.lora_A = self._new_param(config.r, self.in_features)
        self.lora_B = self._new_param(self.out_features, config.r)
        self._kaiming_(self.lora_A)
        if not config.init_lora_weights:
            self._kaiming_(self.lora_B)

    def delta(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
