"""Plain LoRA, one rank at a time: the slowest possible spelling of B A x, used to test the layer."""

import torch


def lora_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """delta for flattened input x [T, in] (dropout not applied)."""
    out = torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    for j in range(layer.config.r):
        out = out + torch.outer(x @ layer.lora_A[j], layer.lora_B[:, j])
    return out * layer.scale
