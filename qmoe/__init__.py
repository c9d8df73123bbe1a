"""qmoe: mixture-of-LoRA-experts adapters (MoELoRA, LoRACoE, LoRAMoE, LoRA) on 4-bit frozen backbones."""

# first, before anything imports bitsandbytes: drops its one import-time notice (see the module)
from . import _bnb_notice  # noqa: F401, I001

from .attach import (
    adapter_config,
    adapter_layers,
    adapter_parameters,
    attach,
    aux_loss,
    aux_loss_parts,
    clear_aux,
    detach,
    set_stage,
    trainable_parameters,
)
from .config import METHODS, AdapterConfig
from .routing import expert_load, routing, set_tracing, token_routing, trace_routing
from .serialization import AdapterError, load_adapter, read_adapter_config, save_adapter

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterError",
    "adapter_config",
    "adapter_layers",
    "adapter_parameters",
    "attach",
    "aux_loss",
    "aux_loss_parts",
    "clear_aux",
    "detach",
    "expert_load",
    "load_adapter",
    "read_adapter_config",
    "routing",
    "save_adapter",
    "set_stage",
    "set_tracing",
    "token_routing",
    "trace_routing",
    "trainable_parameters",
]
