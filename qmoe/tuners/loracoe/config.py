"""LoRACoE defaults, from the LoRACoE paper (App. A): rank 16, alpha 32, 2 composition experts, two-stage
training (LoRA warm-up, then joint LoRA + router).

``composition_scale='rank'`` (qmoe default) multiplies the averaged rank weights by r. Each expert's
softmax over ranks sums to 1, so the paper's literal formula shrinks the warmed-up LoRA update by r at the
switch to joint training; with the factor r a zero-initialised router reproduces the warm-up LoRA exactly
and training continues smoothly. It is only a rescaling of the constant in front of the sum (the paper's
formula carries no alpha/r at all); ``'paper'`` gives the literal 1/E double sum times alpha/r.
"""

DEFAULTS = {
    "r": 16,
    "alpha": 32.0,
    "dropout": 0.05,
    "num_experts": 2,
    "composition_scale": "rank",
    "stage": "joint",
}
