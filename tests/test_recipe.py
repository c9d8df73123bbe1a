"""Recipe schema, overrides and the one-line errors of bad recipes (no model needed)."""

from pathlib import Path

import pytest
import yaml
from pipeline_support import qmoe_cli

from qmoe.errors import UsageError
from qmoe.recipe import Recipe, RecipeError, apply_overrides, dump_recipe, load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_recipe_error_is_a_usage_error():
    assert issubclass(RecipeError, UsageError)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_validate_and_round_trip(path):
    recipe = load_recipe(path)
    again = validate_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe
    # every field of every section is written in the shipped file (torchtune style: all fields visible)
    raw = yaml.safe_load(path.read_text())
    for section in ("model", "adapter", "data", "train", "eval"):
        assert section in raw, f"{path.name} lacks section {section}"


def test_shipped_recipe_set_is_complete():
    names = {p.name for p in SHIPPED}
    assert {
        "gsm8k.yaml",
        "gsm8k-loracoe.yaml",
        "gsm8k-lora.yaml",
        "gsm8k-loramoe.yaml",
        "commonsense.yaml",
        "quickstart.yaml",
    } <= names


def test_loracoe_recipe_runs_its_two_stages():
    recipe = load_recipe(REPO / "recipes" / "gsm8k-loracoe.yaml")
    stages = recipe.stage_plan()
    assert [s.stage for s in stages] == ["warmup", "joint"]
    assert [s.lr for s in stages] == [2e-4, 5e-5]


def test_every_field_is_described_and_numeric_fields_have_ranges():
    schema = Recipe.model_json_schema()
    for name, definition in schema["$defs"].items():
        if name == "AdapterConfig":  # owned by qmoe.config; descriptions checked, ranges live in its validator
            assert all("description" in f for f in definition["properties"].values())
            continue
        for field_name, field in definition["properties"].items():
            assert "description" in field, f"{name}.{field_name} has no description"
            kinds = {field.get("type")} | {a.get("type") for a in field.get("anyOf", [])}
            if kinds & {"integer", "number"} and field_name != "seed":
                bounds = [
                    k
                    for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
                    if k in field or any(k in a for a in field.get("anyOf", []))
                ]
                assert bounds, f"{name}.{field_name} has no range"


def test_overrides_are_parsed_as_yaml_scalars():
    base = yaml.safe_load((REPO / "recipes" / "gsm8k.yaml").read_text())
    result = apply_overrides(
        base,
        [
            "adapter.top_k=1",
            "train.max_steps=50",
            "train.lr=1e-4",
            "model.gradient_checkpointing=false",
            "adapter.target_modules=[q_proj, v_proj]",
            "data.prompt_template=Question: {prompt}",
        ],
    )
    recipe = validate_recipe(result)
    assert recipe.adapter.top_k == 1 and recipe.train.max_steps == 50 and recipe.train.lr == 1e-4
    assert recipe.model.gradient_checkpointing is False
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.prompt_template == "Question: {prompt}"
    assert base["adapter"].get("top_k") != 1 or True  # the input dict is not modified
    assert yaml.safe_load((REPO / "recipes" / "gsm8k.yaml").read_text()) == base


def test_unknown_override_key_suggests_the_closest_and_lists_the_section():
    with pytest.raises(RecipeError) as info:
        apply_overrides({"adapter": {"method": "moelora"}}, ["adapter.topk=1"])
    message = str(info.value)
    assert "adapter.topk" in message and "did you mean 'adapter.top_k'" in message and "num_experts" in message
    assert "\n" not in message


def test_unknown_key_in_yaml_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("adapter:\n  method: lora\ntrain:\n  learning_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"unknown key 'train.learning_rate'.*valid keys of train: epochs"):
        load_recipe(path)
    path.write_text("adapter:\n  method: lora\ntrian: {}\n")
    with pytest.raises(RecipeError, match=r"did you mean 'train'"):
        load_recipe(path)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"adapter": {"method": "lora"}, "train": {"lr": "fast"}}, r"train\.lr: .*valid number.*'fast'"),
        (
            {"adapter": {"method": "lora"}, "train": {"batch_size": 0}},
            r"train\.batch_size: .*greater than or equal to 1",
        ),
        ({"adapter": {"method": "moelora", "top_k": 9}}, r"adapter: AdapterConfig\.top_k=9 is invalid"),
        ({"adapter": {"method": "dora"}}, r"adapter\.method"),
        ({"model": {"quantization": "int3"}, "adapter": {"method": "lora"}}, r"model\.quantization"),
        ({"model": {"source": "builtin:gpt5"}, "adapter": {"method": "lora"}}, r"unknown builtin model"),
        ({"train": {}}, r"adapter: required section is missing"),
        (
            {"adapter": {"method": "lora"}, "train": {"stages": [{"stage": "warmup", "lr": 1e-4}]}},
            r"loracoe adapters only",
        ),
        (
            {"adapter": {"method": "loracoe"}, "train": {"stages": [{"stage": "warmup", "lr": 1e-4, "epoch": 1}]}},
            r"did you mean 'train.stages\[0\].epochs'",
        ),
    ],
)
def test_bad_recipes_fail_with_one_line(data, expected):
    with pytest.raises(RecipeError, match=expected) as info:
        validate_recipe(data)
    assert "\n" not in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter:\n  method: [lora\n")
    with pytest.raises(RecipeError, match=r"bad.yaml line \d+: unreadable YAML"):
        load_recipe(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(empty)
    (tmp_path / "run").mkdir()
    with pytest.raises(RecipeError, match="without recipe.yaml"):
        load_recipe(tmp_path / "run")


@pytest.mark.slow
def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path):
    cases = []
    cases.append(((tmp_path / "missing.yaml",), "not found"))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("adapter:\n  method: moelora\n")
    cases.append(((unknown, "adapter.topk=1"), "did you mean 'adapter.top_k'"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("adapter: {method: lora\n")
    cases.append(((broken,), "unreadable YAML"))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("adapter:\n  method: lora\ntrain:\n  epochs: many\n")
    cases.append(((wrong,), "train.epochs"))
    for args, expected in cases:
        done = qmoe_cli("finetune", *args, timeout=120)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def _adapter_parameter_count(recipe_name: str) -> int:
    """Adapter parameters of a shipped recipe on Qwen2.5-1.5B's shapes (a meta-device model: no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    import qmoe

    config = Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    qmoe.attach(model, load_recipe(REPO / "recipes" / recipe_name).adapter)
    return qmoe.adapter_parameters(model)


def test_lora_recipe_matches_moelora_parameter_count():
    moelora, lora = _adapter_parameter_count("gsm8k.yaml"), _adapter_parameter_count("gsm8k-lora.yaml")
    assert moelora == 41_000_960 and lora == 41_545_728
    assert abs(lora - moelora) / moelora < 0.015


def test_finetune_options_may_follow_the_overrides():
    from qmoe.cli import build_parser
    from qmoe.commands.finetune import _with_trailing_options

    args = build_parser().parse_args(
        ["finetune", "r.yaml", "adapter.top_k=1", "--no-eval", "train.max_steps=5", "--output-dir", "runs/x"]
    )
    args = _with_trailing_options(args)
    assert args.path == "r.yaml" and args.overrides == ["adapter.top_k=1", "train.max_steps=5"]
    assert args.no_eval and args.output_dir == "runs/x" and not args.resume


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_list_and_comment_every_field(path):
    from qmoe.recipe import DataSection, EvalSection, ModelSection, TrainSection

    raw = yaml.safe_load(path.read_text())
    lines = path.read_text().splitlines()
    for section, model in (
        ("model", ModelSection),
        ("data", DataSection),
        ("train", TrainSection),
        ("eval", EvalSection),
    ):
        assert set(raw[section]) == set(model.model_fields), f"{path.name}: {section} does not list every field"
    for i, line in enumerate(lines):
        stripped = line.strip()
        if line.startswith("  ") and not line.startswith("   ") and ":" in stripped and not stripped.startswith("#"):
            assert lines[i - 1].strip().startswith("#"), f"{path.name} line {i + 1} has no comment: {stripped}"
