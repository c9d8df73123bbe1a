"""Model cards: the ``README.md`` of every adapter folder, which the Hugging Face Hub shows as the repo's page.

Built with huggingface_hub's ``ModelCard``/``ModelCardData``: the YAML header carries ``base_model``,
``library_name`` (``peft`` for a LoRA folder, which PEFT loads as it is; ``qmoe`` for the mixtures), tags,
datasets and, when the run was evaluated, a ``model-index`` with the accuracy. The text says what the method is,
how to load the adapter, its configuration, what it was trained on and how, the evaluation and the recipe.

:func:`write_model_card` writes one from what is known (``save_adapter`` knows the adapter and the base model;
``qmoe finetune`` adds the recipe, the training figures and the evaluation: :func:`write_run_model_card`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import atomic_write_text

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from .config import AdapterConfig
    from .recipe import Recipe

CARD_FILE = "README.md"
# a card carrying this line was written by qmoe, and qmoe may rewrite it (e.g. when pushing a run); remove the
# line to keep your own edits
GENERATED_MARK = "<!-- written by qmoe: rewritten on qmoe push of a run; delete this line to keep your edits -->"
# the hub repository each builtin model was converted from (the card's base_model must be a hub id)
BUILTIN_HUB_IDS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# hub datasets behind qmoe's builtin data sources
BUILTIN_DATASETS = {"gsm8k": "openai/gsm8k"}
METHOD_TEXT = {
    "lora": "LoRA: one low-rank update B·A per adapted linear layer",
    "loramoe": "LoRAMoE: one LoRA split into experts of rank r/N, mixed by a dense softmax router",
    "moelora": "MoELoRA: N LoRA experts per layer, a top-k router, load-balancing and expert-contrastive losses",
    "loracoe": "LoRACoE: the ranks of one LoRA composed per token by softmax routers (experts at rank level)",
}


def hub_base_model(name: str | None) -> str | None:
    """The hub id to name as ``base_model``: a builtin source or its converted cache folder maps to the hub
    repo it came from; a hub id stays; a local folder has none."""
    if not name:
        return None
    if name in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name]
    from .models import BUILTIN_GGUF

    for source, (_, _, folder) in BUILTIN_GGUF.items():
        if Path(name).name == folder and source in BUILTIN_HUB_IDS:
            return BUILTIN_HUB_IDS[source]
    return name if _looks_like_hub_id(name) else None


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _dataset_id(source: str) -> str | None:
    if source in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[source]
    return source if _looks_like_hub_id(source) else None


def build_model_card(
    config: AdapterConfig,
    base_model: str | None,
    *,
    recipe: Recipe | None = None,
    eval_result: dict | None = None,
    training: dict | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The card of an adapter. ``training``: figures of the run (``steps``, ``final_loss``)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base_id = hub_base_model(base_model)
    quantization = recipe.model.quantization if recipe is not None else "nf4"
    tags = ["qmoe", config.method, "lora"]
    if config.method != "lora":
        tags.append("mixture-of-experts")
    if quantization != "none":
        tags += ["bitsandbytes", "4-bit", quantization]
    datasets = None
    if recipe is not None and (dataset := _dataset_id(recipe.data.source)) is not None:
        datasets = [dataset]
    name = repo_id.rsplit("/", 1)[-1] if repo_id else f"{config.method} adapter"
    eval_results = None
    if eval_result and "accuracy" in eval_result:
        task = str(eval_result.get("task", "eval"))
        eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=BUILTIN_DATASETS.get(task, task),
                dataset_name=task,
                metric_type="accuracy",
                metric_value=float(eval_result["accuracy"]),
            )
        ]
    data = ModelCardData(
        base_model=base_id,
        library_name="peft" if config.method == "lora" else "qmoe",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets,
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    body = _body(config, base_model, base_id, recipe, eval_result, training, repo_id, name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{GENERATED_MARK}\n\n{body}")


def _body(
    config: AdapterConfig,
    base_model: str | None,
    base_id: str | None,
    recipe: Recipe | None,
    eval_result: dict | None,
    training: dict | None,
    repo_id: str | None,
    name: str,
) -> str:
    where = repo_id or "ADAPTER_FOLDER_OR_REPO_ID"
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base_model or 'unknown'}`"
    source = recipe.model.source if recipe is not None else (base_id or base_model or "BASE_MODEL")
    quantized = recipe is None or recipe.model.quantization != "none"
    backbone = (
        f"a frozen 4-bit {recipe.model.quantization.upper() if recipe else 'NF4'} backbone"
        if quantized
        else "a frozen backbone"
    )
    lines = [
        f"# {name}",
        "",
        f"A **{config.method}** adapter for {base_text}, trained with qmoe on {backbone}.",
        "",
        f"{METHOD_TEXT[config.method]}.",
        "",
        "## Use",
        "",
        "With qmoe installed:",
        "",
        "```bash",
        f"qmoe chat {where}" + ("" if base_id or recipe is not None else " --base BASE_MODEL"),
        f"qmoe eval {where} --task gsm8k",
        "```",
        "",
        "```python",
        "import qmoe",
        "from qmoe.models import load_base_model",
        "",
        f'model, tokenizer, _ = load_base_model("{source}")',
        f'qmoe.load_adapter(model, "{where}")',
        "```",
        "",
    ]
    if config.method == "lora":
        lines += [
            "A plain PEFT LoRA folder as well: `peft.PeftModel.from_pretrained(base, "
            f'"{where}")` loads it with identical outputs.',
            "",
        ]
    else:
        lines += [
            f"PEFT loads it too once qmoe has registered its methods: `import qmoe.peft_integration`, then "
            f'`peft.PeftModel.from_pretrained(base, "{where}")`.',
            "",
        ]
    lines += ["## Adapter", "", "| field | value |", "| --- | --- |"]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in config.to_dict().items() if v is not None]
    lines.append("")
    if recipe is not None:
        d, t = recipe.data, recipe.train
        data_line = f"`{d.source}` (format {d.format}, max_length {d.max_length}"
        data_line += f", first {d.limit} examples)" if d.limit else ")"
        lines += [
            "## Training",
            "",
            f"- data: {data_line}",
            f"- backbone: `{recipe.model.source}`, {recipe.model.quantization}, compute dtype "
            f"{recipe.model.compute_dtype}; adapter weights in {t.adapter_dtype}",
            f"- optimizer {t.optim}, lr {t.lr:g} ({t.schedule}, warm-up {t.warmup_ratio:g}), batch "
            f"{t.batch_size} x {t.gradient_accumulation} accumulation, "
            + (f"{t.max_steps} steps" if t.max_steps else f"epochs {t.epochs:g}")
            + f", seed {t.seed}",
        ]
        if recipe.train.stages:
            lines.append("- stages: " + ", ".join(f"{s.stage} (lr {s.lr:g})" for s in recipe.train.stages))
        if training:
            figures = []
            if training.get("steps") is not None:
                figures.append(f"{training['steps']} optimizer steps")
            if training.get("final_loss") is not None:
                figures.append(f"final training loss {training['final_loss']:.4f}")
            if figures:
                lines.append("- run: " + ", ".join(figures))
        lines.append("")
    if eval_result and "accuracy" in eval_result:
        lines += [
            "## Evaluation",
            "",
            "| task | scorer | examples | correct | accuracy |",
            "| --- | --- | --- | --- | --- |",
            f"| {eval_result.get('task')} | {eval_result.get('scorer', 'exact')} | {eval_result.get('n')} | "
            f"{eval_result.get('correct')} | {float(eval_result['accuracy']):.4f} |",
            "",
            "Greedy decoding, qmoe's evaluation (`qmoe eval`).",
            "",
        ]
    if recipe is not None:
        from .recipe import dump_recipe

        lines += ["## Recipe", "", "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(lines)


def write_model_card(directory: str | Path, config: AdapterConfig, base_model: str | None, **kwargs: Any) -> Path:
    """Write ``directory/README.md`` (atomically); ``kwargs`` as :func:`build_model_card`."""
    path = Path(directory) / CARD_FILE
    atomic_write_text(path, str(build_model_card(config, base_model, **kwargs)))
    return path


def is_generated(path: str | Path) -> bool:
    """Whether a README.md is qmoe's own card (which qmoe may rewrite)."""
    path = Path(path)
    try:
        return GENERATED_MARK in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def run_training_figures(run_dir: Path) -> dict:
    """Steps and final training loss of a run, from its metrics.jsonl."""
    from .io import read_jsonl
    from .rundir import METRICS

    records = read_jsonl(run_dir / METRICS)
    if not records:
        return {}
    return {"steps": records[-1].get("step"), "final_loss": records[-1].get("loss")}


def write_run_model_card(run_dir: str | Path, adapter_dir: str | Path | None = None, **kwargs: Any) -> Path:
    """The card of a run's adapter from the run directory: recipe.yaml, metrics.jsonl and eval.json (when
    there); ``kwargs`` (e.g. ``repo_id``, ``eval_result``) override what is read."""
    from .recipe import load_recipe
    from .rundir import ADAPTER, EVAL
    from .serialization import read_adapter_config

    run_dir = Path(run_dir)
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else run_dir / ADAPTER
    config, _, raw = read_adapter_config(adapter_dir)
    recipe = load_recipe(run_dir)
    if "eval_result" not in kwargs and (run_dir / EVAL).is_file():
        try:
            kwargs["eval_result"] = json.loads((run_dir / EVAL).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass  # a damaged eval.json only leaves the card without figures
    kwargs.setdefault("training", run_training_figures(run_dir))
    base = raw.get("base_model_name_or_path") or recipe.model.source
    if recipe.model.source in BUILTIN_HUB_IDS:
        base = recipe.model.source
    return write_model_card(adapter_dir, config, base, recipe=recipe, **kwargs)
