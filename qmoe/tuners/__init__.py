"""One folder per adapter method (PEFT's tuner layout): ``config.py`` holds the paper defaults,
``layer.py`` the batched layer, ``reference.py`` a plain per-expert loop used by tests and benchmarks."""

from .lora.config import DEFAULTS as _LORA
from .loracoe.config import DEFAULTS as _LORACOE
from .loramoe.config import DEFAULTS as _LORAMOE
from .moelora.config import DEFAULTS as _MOELORA

METHOD_DEFAULTS = {"lora": _LORA, "loramoe": _LORAMOE, "moelora": _MOELORA, "loracoe": _LORACOE}


def layer_class(method: str):
    """The adapter layer class for a method name (imported lazily to keep config import light)."""
    if method == "lora":
        from .lora.layer import LoraLayer as cls
    elif method == "loramoe":
        from .loramoe.layer import LoraMoELayer as cls
    elif method == "moelora":
        from .moelora.layer import MoELoraLayer as cls
    elif method == "loracoe":
        from .loracoe.layer import LoraCoELayer as cls
    else:  # AdapterConfig already restricts the names
        raise ValueError(f"unknown method {method!r}")
    return cls
