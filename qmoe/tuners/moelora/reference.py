"""MoELoRA as the paper describes it: route each token to its top-k experts, run each expert on its tokens
in a Python loop and sum the weighted outputs. Slow; used to test the batched layer and as the benchmarks'
per-expert-loop baseline."""

import torch


def moelora_reference(layer, x: torch.Tensor) -> torch.Tensor:
    c = layer.config
    n, r, k = c.num_experts, c.r, c.top_k
    probs = torch.softmax((x @ layer.router.t()).float(), dim=-1)
    top_w, top_ids = probs.topk(k, dim=-1)
    top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    for e in range(n):
        a_e = layer.lora_A[e * r : (e + 1) * r]
        b_e = layer.lora_B[:, e * r : (e + 1) * r]
        for slot in range(k):
            rows = (top_ids[:, slot] == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                y = (x[rows] @ a_e.t()) @ b_e.t()
                out = out.index_add(0, rows, top_w[rows, slot : slot + 1] * y)
    return out * layer.scale
