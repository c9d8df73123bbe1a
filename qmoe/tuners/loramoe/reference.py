"""LoRAMoE as written in eq. 5: a Python loop over the experts."""

import torch


def loramoe_reference(layer, x: torch.Tensor) -> torch.Tensor:
    n, r = layer.config.num_experts, layer.config.r
    per = r // n
    probs = torch.softmax(x @ layer.router.t(), dim=-1)
    out = torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    for i in range(n):
        a_i = layer.lora_A[i * per : (i + 1) * per]
        b_i = layer.lora_B[:, i * per : (i + 1) * per]
        out = out + probs[:, i : i + 1] * ((x @ a_i.t()) @ b_i.t())
    return out * layer.scale
