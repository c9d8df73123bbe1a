"""MoELoRA defaults.

From the paper (arXiv 2402.12851, §4): 8 experts, rank 4 each, top-2 routing.
The paper does not state alpha, the loss weights, the temperature or the queue size; qmoe's choices:
alpha = 2r = 8 (the usual LoRA ratio); balance weight 0.01 (Switch Transformer's coefficient);
contrastive weight 0.1 and tau 0.07 (MoCo's temperature); 64 queued keys per expert and 64 anchor
tokens per layer per step, which bounds the loss's extra compute and memory independently of batch size.
"""

DEFAULTS = {
    "r": 4,
    "alpha": 8.0,
    "dropout": 0.05,
    "num_experts": 8,
    "top_k": 2,
    "balance_loss_weight": 0.01,
    "contrastive_loss_weight": 0.1,
    "contrastive_temperature": 0.07,
    "contrastive_queue_size": 64,
    "contrastive_samples": 64,
}

# the rank-space contrastive loss shifts its logits by the largest possible one, 1/tau, so its smallest term,
# exp(-2/tau), must stay a normal fp32 number: tau >= 0.025 (2/0.025 = 80 < 87); see losses.py
MIN_TEMPERATURE = 0.025
