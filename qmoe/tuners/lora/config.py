"""LoRA defaults. r=16, alpha=32: the setting both the LoRACoE paper (App. A) and common QLoRA practice
use; dropout 0.05 is PEFT's and QLoRA's usual value."""

DEFAULTS = {"r": 16, "alpha": 32.0, "dropout": 0.05}
