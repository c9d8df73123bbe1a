"""MoELoRA, LoRACoE and LoRAMoE as PEFT methods: ``PeftModel.from_pretrained(base, folder)`` and
``get_peft_model(model, MoELoraConfig(...))`` work once this module is imported (importing it registers them).

    import qmoe.peft_integration  # noqa: F401  (registers the methods with PEFT)
    from peft import PeftModel
    model = PeftModel.from_pretrained(base, "runs/x/adapter")

The PEFT route builds exactly what :func:`qmoe.attach` builds (the same layers, with PEFT's tuner-layer
interface mixed in), so logits, routing telemetry and ``qmoe.aux_loss`` are the same either way, and a folder
written by ``qmoe.save_adapter`` or ``PeftModel.save_pretrained`` loads through both. ``qmoe.attach`` stays
the short path. What a single-adapter, input-routed method cannot do is refused with an error: a second adapter
on the same model, ``merge_and_unload`` (the mixture depends on every input, so there is no merged weight) and
``low_cpu_mem_usage=True``. ``disable_adapter()`` and ``unload()`` work. A ``lora`` AdapterConfig maps to PEFT's
own ``LoraConfig`` (qmoe's lora folders are PEFT LoRA folders).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from peft import LoraConfig, PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .attach import adapter_config, adapter_layers, attach, detach
from .config import AdapterConfig
from .hf_private import PeftTunerHooks, register_peft_type
from .serialization import AdapterError
from .tuners.base import AdapterLayer
from .tuners.loracoe.layer import LoraCoELayer
from .tuners.loramoe.layer import LoraMoELayer
from .tuners.moelora.layer import MoELoraLayer

_PEFT_PREFIX = "base_model.model."


class QmoePeftType(enum.StrEnum):
    """``peft_type`` of qmoe's methods in ``adapter_config.json`` (a ``str`` enum, as PEFT's own ``PeftType``)."""

    MOELORA = "MOELORA"
    LORACOE = "LORACOE"
    LORAMOE = "LORAMOE"


# ---- configs ------------------------------------------------------------------------------------------------


@dataclass
class _QmoeConfig(PeftConfig):
    """Fields shared by the mixtures; ``None`` takes the method's paper default (qmoe/tuners/<method>/config.py),
    filled in at construction so that a saved config states every value."""

    method: ClassVar[str]
    task_type: str | Any | None = field(default="CAUSAL_LM", metadata={"help": "qmoe adapts causal LMs"})
    r: int | None = field(default=None, metadata={"help": "LoRA rank (per expert for moelora)"})
    alpha: float | None = field(default=None, metadata={"help": "scaling numerator: the update is scaled by alpha/r"})
    dropout: float | None = field(default=None, metadata={"help": "dropout on the adapter input"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module-name suffixes, 'all-linear', or one regex; None: qmoe's defaults"}
    )
    num_experts: int | None = field(default=None, metadata={"help": "number of experts"})
    init_lora_weights: bool = field(default=True, metadata={"help": "B starts at zero (adapted model = base)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = QmoePeftType[self.method.upper()]
        resolved = self.to_qmoe()  # validates, naming the field (ValueError)
        for name in self._qmoe_fields():
            setattr(self, name, getattr(resolved, name))

    @classmethod
    def _qmoe_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name in AdapterConfig.model_fields]

    def to_qmoe(self) -> AdapterConfig:
        """The qmoe AdapterConfig this PEFT config describes."""
        values = {name: getattr(self, name) for name in self._qmoe_fields()}
        if values.get("target_modules") is None:
            values.pop("target_modules", None)
        elif isinstance(values["target_modules"], (set, tuple)):
            values["target_modules"] = sorted(values["target_modules"])
        return AdapterConfig(method=self.method, **values)


@dataclass
class MoELoraConfig(_QmoeConfig):
    """MoELoRA (arXiv 2402.12851) as a PEFT config: fields as :class:`qmoe.AdapterConfig`."""

    method: ClassVar[str] = "moelora"
    top_k: int | None = field(default=None, metadata={"help": "experts per token"})
    balance_loss_weight: float | None = field(default=None, metadata={"help": "load-balancing loss weight"})
    contrastive_loss_weight: float | None = field(default=None, metadata={"help": "contrastive loss weight"})
    contrastive_temperature: float | None = field(default=None, metadata={"help": "contrastive temperature"})
    contrastive_queue_size: int | None = field(default=None, metadata={"help": "queued keys per expert"})
    contrastive_samples: int | None = field(default=None, metadata={"help": "anchor tokens per layer per step"})


@dataclass
class LoraCoEConfig(_QmoeConfig):
    """LoRACoE (LoRA composition of experts) as a PEFT config: fields as :class:`qmoe.AdapterConfig`."""

    method: ClassVar[str] = "loracoe"
    composition_scale: Literal["rank", "paper"] | None = field(default=None, metadata={"help": "rank | paper"})
    stage: Literal["warmup", "joint"] | None = field(default=None, metadata={"help": "warmup | joint"})


@dataclass
class LoraMoEConfig(_QmoeConfig):
    """Partition-based LoRAMoE as a PEFT config: fields as :class:`qmoe.AdapterConfig`."""

    method: ClassVar[str] = "loramoe"


CONFIG_CLASSES: dict[str, type[_QmoeConfig]] = {c.method: c for c in (MoELoraConfig, LoraCoEConfig, LoraMoEConfig)}


def peft_config(config: AdapterConfig, **peft_fields: Any) -> PeftConfig:
    """The PEFT config of a qmoe AdapterConfig (``peft_fields``: PEFT's own, e.g. ``base_model_name_or_path``);
    ``lora`` gives PEFT's ``LoraConfig``."""
    if config.method == "lora":
        targets = config.target_modules
        return LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets if isinstance(targets, str) else list(targets),
            bias="none",
            task_type=peft_fields.pop("task_type", "CAUSAL_LM"),
            init_lora_weights=config.init_lora_weights,
            **peft_fields,
        )
    cls = CONFIG_CLASSES[config.method]
    values = {name: getattr(config, name) for name in cls._qmoe_fields()}
    return cls(**values, **peft_fields)


# ---- layers and tuners --------------------------------------------------------------------------------------


class _PeftLayer(BaseTunerLayer):
    """PEFT's tuner-layer interface on a qmoe layer. qmoe layers hold one adapter as plain parameters (no
    per-adapter-name dicts), so PEFT's adapter-name bookkeeping is empty; disabling returns the base output."""

    adapter_layer_names = ()

    def forward(self, x, *args, **kwargs):
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(
            f"{self.config.method} cannot be merged into the base weights: its update depends on each input's "
            "routing. Keep the adapter (PeftModel) or use unload() to get the base model back"
        )


class PeftMoELoraLayer(_PeftLayer, MoELoraLayer):
    """MoELoRA layer as PEFT sees it."""


class PeftLoraCoELayer(_PeftLayer, LoraCoELayer):
    """LoRACoE layer as PEFT sees it."""


class PeftLoraMoELayer(_PeftLayer, LoraMoELayer):
    """LoRAMoE layer as PEFT sees it."""


_LAYERS = {"moelora": PeftMoELoraLayer, "loracoe": PeftLoraCoELayer, "loramoe": PeftLoraMoELayer}


def _adapter_keys(model: nn.Module) -> set[str]:
    """The adapter tensors of ``model`` as PEFT names them in a folder (``base_model.model.`` + qmoe's name)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            stripped = name.removeprefix(_PEFT_PREFIX)
            keys.update(f"{_PEFT_PREFIX}{stripped}.{p}" for p in module.adapter_param_names)
    return keys


class _QmoeTuner(PeftTunerHooks):
    """A PEFT tuner whose injection is :func:`qmoe.attach` with the PEFT-flavoured layer class."""

    method: ClassVar[str]
    tuner_layer_cls = _PeftLayer
    target_module_mapping: ClassVar[dict] = {}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
    ) -> None:
        if adapter_config(model) is not None or len(self.peft_config) > 1:
            raise ValueError(
                f"a qmoe {self.method} model holds one adapter: cannot add {adapter_name!r} "
                "(load a fresh base model for another adapter)"
            )
        config = self.peft_config[adapter_name]
        attach(model, config.to_qmoe(), layer_cls=_LAYERS[self.method])
        layers = adapter_layers(model)
        if any(p.is_meta for layer in layers.values() for p in layer.parameters(recurse=False)):
            detach(model)
            raise ValueError(f"low_cpu_mem_usage=True is not supported by qmoe's {self.method}: pass False")
        self.targeted_module_names = list(layers)
        for layer in layers.values():
            layer._active_adapter = adapter_name
            if config.inference_mode:
                for name in layer.adapter_param_names:
                    getattr(layer, name).requires_grad_(False)

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        raise ValueError(
            f"{self.method} cannot be merged into the base weights: its update depends on each input's routing "
            "(use unload() for the base model, or keep the adapter)"
        )

    def unload(self) -> nn.Module:
        detach(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        detach(self.model)
        del self.peft_config[adapter_name]
        self.active_adapter = []

    @classmethod
    def check_loaded_state(cls, model: nn.Module, state_dict: dict) -> None:
        expected = _adapter_keys(model)
        given = {_PEFT_PREFIX + k.removeprefix(_PEFT_PREFIX) for k in state_dict}
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if missing or unexpected:
            raise AdapterError(
                f"the adapter's tensors do not match this {cls.method} model: missing {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                f"{' ...' if len(unexpected) > 3 else ''} (different base model or adapter config?)"
            )


class MoELoraModel(_QmoeTuner):
    method = "moelora"
    prefix = "moelora_"


class LoraCoEModel(_QmoeTuner):
    method = "loracoe"
    prefix = "loracoe_"


class LoraMoEModel(_QmoeTuner):
    method = "loramoe"
    prefix = "loramoe_"


def register() -> None:
    """Register the three methods with PEFT (idempotent; done when this module is imported)."""
    for tuner in (MoELoraModel, LoraCoEModel, LoraMoEModel):
        register_peft_type(QmoePeftType[tuner.method.upper()], CONFIG_CLASSES[tuner.method], tuner, tuner.prefix)


register()
