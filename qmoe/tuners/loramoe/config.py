"""Partition-based LoRAMoE defaults, from the LoRACoE paper's baseline (App. A): rank 16 split into
4 experts of rank 4, alpha 32, dense softmax gate."""

DEFAULTS = {"r": 16, "alpha": 32.0, "dropout": 0.05, "num_experts": 4}
