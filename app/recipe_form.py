"""The Train tab's form, independent of Gradio: which recipe fields it edits, their defaults and ranges
(read from the recipe schema), and turning form values into a validated recipe with the same
``qmoe.recipe`` functions the CLI uses, so the form refuses exactly what ``qmoe finetune`` would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from qmoe.config import METHODS
from qmoe.recipe import Recipe, RecipeError, apply_overrides, dump_recipe, read_recipe_file, validate_recipe
from qmoe.tuners import METHOD_DEFAULTS

from .paths import recipe_path, resolve_model_source


@dataclass(frozen=True)
class FormField:
    key: str  # dotted recipe key
    label: str
    kind: str  # "text" | "choice" | "int" | "float" | "bool"


FIELDS = (
    FormField("model.source", "Model source", "text"),
    FormField("adapter.method", "Adapter method", "choice"),
    FormField("adapter.num_experts", "Experts per layer", "int"),
    FormField("adapter.top_k", "Top-k (experts per token)", "int"),
    FormField("adapter.r", "Rank r", "int"),
    FormField("adapter.alpha", "Alpha (update scaled by alpha/r)", "float"),
    FormField("adapter.balance_loss_weight", "Balance loss weight", "float"),
    FormField("adapter.contrastive_loss_weight", "Contrastive loss weight", "float"),
    FormField("train.lr", "Learning rate", "float"),
    FormField("train.epochs", "Epochs", "float"),
    FormField("train.max_steps", "Max steps (empty = from epochs)", "int"),
    FormField("train.batch_size", "Batch size", "int"),
    FormField("train.gradient_accumulation", "Gradient accumulation", "int"),
    FormField("train.logging_steps", "Log metrics every N steps (Monitor tab)", "int"),
    FormField("data.max_length", "Max length (tokens per example)", "int"),
    FormField("data.limit", "Training examples (empty = all)", "int"),
    FormField("eval.enabled", "Evaluate after training", "bool"),
    FormField("eval.limit", "Evaluation examples (empty = all)", "int"),
)
FIELD_KEYS = [f.key for f in FIELDS]
# adapter fields a method uses: those it has a paper default for (plus r/alpha, which all have)
ADAPTER_FIELDS = [f.key.split(".", 1)[1] for f in FIELDS if f.key.startswith("adapter.") and f.key != "adapter.method"]


def method_uses(method: str, field: str) -> bool:
    return field in METHOD_DEFAULTS.get(method, {})


def _resolve_ref(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    if "allOf" in node and len(node["allOf"]) == 1:
        return _resolve_ref(schema, node["allOf"][0])
    return node


@lru_cache(maxsize=1)
def _schema() -> dict:
    return Recipe.model_json_schema()


def field_schema(key: str) -> dict:
    """JSON-schema properties of a dotted recipe key, with ``anyOf`` (optional fields) flattened."""
    schema = _schema()
    node = schema
    for part in key.split("."):
        node = _resolve_ref(schema, node)
        node = node.get("properties", {}).get(part, {})
    merged = {k: v for k, v in node.items() if k != "anyOf"}
    for option in node.get("anyOf", []):
        option = _resolve_ref(schema, option)
        for k, v in option.items():
            merged.setdefault(k, v)
    return merged


def field_info(key: str, method: str | None = None) -> str:
    """One line for under a form field: its description, valid range and default."""
    props = field_schema(key)
    parts = [props.get("description", "")]
    low = props.get("minimum", props.get("exclusiveMinimum"))
    high = props.get("maximum", props.get("exclusiveMaximum"))
    if low is not None or high is not None:
        lo_b = "[" if "minimum" in props else "("
        hi_b = "]" if "maximum" in props else ")"
        parts.append(f"range {lo_b}{'' if low is None else low}, {'∞' if high is None else high}{hi_b}")
    section, name = key.split(".", 1)
    if section == "adapter" and method and name in METHOD_DEFAULTS.get(method, {}):
        parts.append(f"{method} default: {METHOD_DEFAULTS[method][name]}")
    elif "default" in props and props["default"] is not None:
        parts.append(f"default: {props['default']}")
    return " · ".join(p for p in parts if p)


def _get(data: dict, key: str):
    node = data
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def recipe_form_values(recipe_name: str) -> tuple[dict, dict]:
    """(raw recipe mapping, {key: value shown in the form}) for a shipped recipe, defaults resolved."""
    raw = read_recipe_file(recipe_path(recipe_name))
    resolved = validate_recipe(raw).model_dump(mode="json")
    return raw, {key: _get(resolved, key) for key in FIELD_KEYS}


def method_field_values(recipe_name: str, method: str) -> dict:
    """Adapter field values after choosing ``method``: the recipe's own values when the recipe uses that
    method, else the method's paper defaults; ``None`` for fields the method does not use."""
    _, values = recipe_form_values(recipe_name)
    same = values["adapter.method"] == method
    out = {}
    for name in ADAPTER_FIELDS:
        key = f"adapter.{name}"
        if not method_uses(method, name):
            out[key] = None
        elif same:
            out[key] = values[key]
        else:
            out[key] = METHOD_DEFAULTS[method][name]
    return out


def _as_int(key: str, value):
    if value is None or value == "":
        return None
    if isinstance(value, float):
        if not value.is_integer():
            raise RecipeError(f"{key}: must be a whole number (got {value})")
        return int(value)
    return value


def build_recipe(recipe_name: str, form: dict, models_dir: Path, output_dir: str) -> tuple[Recipe, str]:
    """Validate the form against the recipe schema; returns the resolved recipe and its YAML.

    Raises ``RecipeError`` (or ``UnsafePathError`` for a model source outside the allowed places) with
    one readable line.
    """
    if recipe_name is None:
        raise RecipeError("choose a recipe first")
    raw = read_recipe_file(recipe_path(recipe_name))
    method = form.get("adapter.method")
    if method not in METHODS:
        raise RecipeError(f"adapter.method: must be one of {', '.join(METHODS)} (got {method!r})")
    overrides = []
    for field in FIELDS:
        value = form.get(field.key)
        if field.key == "model.source":
            value = resolve_model_source(value, models_dir)
        elif field.kind == "int":
            value = _as_int(field.key, value)
        elif field.kind == "text" and isinstance(value, str):
            value = value.strip() or None
        section, name = field.key.split(".", 1)
        if section == "adapter" and name != "method" and not method_uses(method, name):
            value = None  # a field this method has no use for (e.g. top_k for plain LoRA)
        # JSON is valid YAML, so every value round-trips through apply_overrides' YAML parsing exactly
        overrides.append(f"{field.key}={json.dumps(value)}" if value is not None else f"{field.key}=")
    if raw.get("adapter", {}).get("method") != method:
        # switching method: drop the recipe's method-specific adapter keys the form does not show
        adapter = dict(raw.get("adapter") or {})
        for name in list(adapter):
            if name not in ("method", "target_modules", "dropout", "init_lora_weights") and name not in ADAPTER_FIELDS:
                adapter.pop(name)
        raw = {**raw, "adapter": adapter}
        if method != "loracoe" and (raw.get("train") or {}).get("stages"):
            raw = {**raw, "train": {**raw["train"], "stages": None}}
    overrides.append(f"output_dir={json.dumps(output_dir)}")
    recipe = validate_recipe(apply_overrides(raw, overrides))
    return recipe, dump_recipe(recipe)
