"""AdapterConfig: one validated description of an adapter, shared by the API, the recipes and saved adapters.

Fields left as ``None`` take the method's paper default (see ``qmoe/tuners/<method>/config.py``), so
``AdapterConfig(method="moelora")`` is the MoELoRA paper's configuration.
"""

from __future__ import annotations

from typing import Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .tuners import METHOD_DEFAULTS
from .tuners.moelora.config import MIN_TEMPERATURE

METHODS = ("lora", "loramoe", "moelora", "loracoe")
Method = Literal["lora", "loramoe", "moelora", "loracoe"]

# The linear layers of a Llama-style block; PEFT and both papers adapt these.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class AdapterConfig(BaseModel):
    """What to attach and how. Invalid values raise ``ValueError`` naming the field and the valid range."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    method: Method = Field(description="lora | loramoe | moelora | loracoe")
    r: int | None = Field(None, description="LoRA rank: total rank for lora/loramoe/loracoe, per expert for moelora")
    alpha: float | None = Field(None, description="LoRA scaling numerator; the update is scaled by alpha/r")
    dropout: float | None = Field(None, description="dropout on the adapter input, in [0, 1)")
    target_modules: list[str] | str = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="module-name suffixes to adapt, 'all-linear', or one regex matched against full names",
    )
    num_experts: int | None = Field(None, description="experts (loramoe, moelora, loracoe)")
    top_k: int | None = Field(None, description="experts per token (moelora)")
    balance_loss_weight: float | None = Field(None, description="weight of the load-balancing loss (moelora)")
    contrastive_loss_weight: float | None = Field(None, description="weight of the expert contrastive loss (moelora)")
    contrastive_temperature: float | None = Field(None, description="temperature tau of the contrastive loss (moelora)")
    contrastive_queue_size: int | None = Field(
        None, description="recent anchors kept per expert as rank vectors, the loss's keys (moelora)"
    )
    contrastive_samples: int | None = Field(None, description="tokens per layer per step used as contrastive anchors")
    composition_scale: Literal["rank", "paper"] | None = Field(
        None, description="loracoe: 'rank' multiplies rank weights by r so uniform routing equals the warm-up LoRA"
    )
    stage: Literal["warmup", "joint"] | None = Field(None, description="loracoe training stage")
    init_lora_weights: bool = Field(True, description="B starts at zero so the adapted model equals the base at step 0")

    @model_validator(mode="after")
    def _fill_defaults_and_check(self) -> AdapterConfig:
        defaults = METHOD_DEFAULTS[self.method]
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        _check(self)
        return self

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.r)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _fail(field: str, value: object, valid: str) -> NoReturn:
    raise ValueError(f"AdapterConfig.{field}={value!r} is invalid: {valid}")


def _check(c: AdapterConfig) -> None:
    if c.r is None or c.r <= 0:
        _fail("r", c.r, "must be an integer >= 1")
    if c.alpha is None or c.alpha <= 0:
        _fail("alpha", c.alpha, "must be > 0")
    if c.dropout is None or not 0.0 <= c.dropout < 1.0:
        _fail("dropout", c.dropout, "must be in [0, 1)")
    if isinstance(c.target_modules, list) and not c.target_modules:
        _fail("target_modules", c.target_modules, "must name at least one module")
    if c.method == "lora":
        return
    if c.num_experts is None or c.num_experts < 1:
        _fail("num_experts", c.num_experts, "must be an integer >= 1")
    if c.method == "loramoe" and c.r % c.num_experts:
        _fail(
            "r",
            c.r,
            f"must be divisible by num_experts={c.num_experts} for loramoe (each expert gets rank r/num_experts)",
        )
    if c.method == "moelora":
        if c.top_k is None or not 1 <= c.top_k <= c.num_experts:
            _fail("top_k", c.top_k, f"must be in [1, num_experts={c.num_experts}]")
        for name in ("balance_loss_weight", "contrastive_loss_weight"):
            if getattr(c, name) < 0:
                _fail(name, getattr(c, name), "must be >= 0")
        if c.contrastive_temperature < MIN_TEMPERATURE:
            why = "the rank-space loss is exact in fp32 down to it"
            _fail("contrastive_temperature", c.contrastive_temperature, f"must be >= {MIN_TEMPERATURE} ({why})")
        if c.contrastive_queue_size < 1:
            _fail("contrastive_queue_size", c.contrastive_queue_size, "must be >= 1")
        if c.contrastive_samples < 1:
            _fail("contrastive_samples", c.contrastive_samples, "must be >= 1")
