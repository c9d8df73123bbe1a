"""LoRACoE's double sum written out: (1/E) sum_i sum_j G_ij B_j A_j x, loops over experts and ranks."""

import torch


def loracoe_reference(layer, x: torch.Tensor) -> torch.Tensor:
    c = layer.config
    e_count, r = c.num_experts, c.r
    out = torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    for i in range(e_count):
        w_route_i = layer.router[i * r : (i + 1) * r]  # [r, in]
        g_i = torch.softmax(x @ w_route_i.t(), dim=-1)  # [T, r]
        for j in range(r):
            a_j = layer.lora_A[j]  # [in]
            b_j = layer.lora_B[:, j]  # [out]
            out = out + g_i[:, j : j + 1] * torch.outer(x @ a_j, b_j)
    return out / e_count * layer.composition_factor * layer.scale
