"""Helpers for the pipeline tests: a tiny chat model (real tokenizer with a chat template + random tiny Llama),
small GSM8K-format data files, and recipe dicts that train in seconds on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def arithmetic_items(n: int, start: int = 0) -> list[dict]:
    """GSM8K-shaped items: question, worked answer ending in '#### N'."""
    items = []
    for i in range(start, start + n):
        a, b = 3 + i % 17, 5 + (i * 7) % 23
        items.append(
            {
                "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
            }
        )
    return items


def build_tiny_chat_model(directory: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A byte-level BPE tokenizer trained on arithmetic text, with a ChatML template, next to a random Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qmoe.testing import save_tiny_llama

    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [f"{x['question']} {x['answer']} user assistant system" for x in arithmetic_items(200)]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    save_tiny_llama(
        directory,
        vocab_size=len(fast),
        hidden=hidden,
        layers=layers,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    fast.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    return path


def tiny_recipe(model_dir: Path, data_dir: Path, output_dir: Path, method: str = "moelora", **sections) -> dict:
    """A recipe dict training the tiny model for a few steps; ``sections`` update the defaults per section."""
    adapter = {"method": method, "r": 2, "alpha": 4, "dropout": 0.1}
    if method in ("moelora", "loramoe"):
        adapter.update(num_experts=4)
    if method == "moelora":
        adapter.update(top_k=2, contrastive_queue_size=8, contrastive_samples=8)
    if method == "loramoe":
        adapter.update(r=4)
    recipe = {
        "model": {
            "source": str(model_dir),
            "quantization": "nf4",
            "compute_dtype": "float32",
            "gradient_checkpointing": True,
            "device": "cpu",
        },
        "adapter": adapter,
        "data": {"task": "gsm8k", "path": str(data_dir / "train.jsonl"), "max_length": 64},
        "train": {
            "max_steps": 6,
            "lr": 5e-3,
            "batch_size": 4,
            "logging_steps": 1,
            "checkpoint_steps": 3,
            "warmup_ratio": 0.0,
            "seed": 7,
        },
        "eval": {"path": str(data_dir / "test.jsonl"), "limit": 4, "batch_size": 4, "max_new_tokens": 8},
        "output_dir": str(output_dir),
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(name, {}).update(values)
        else:
            recipe[name] = values
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


# the console script's entry point, in this interpreter (``python -m qmoe.cli`` would load cli.py twice)
QMOE = [sys.executable, "-c", "import sys; from qmoe.cli import main; sys.exit(main())"]


def _child_env(env: dict | None) -> dict:
    """The environment of a qmoe subprocess: offline, no progress bars; ``env`` adds to it (None removes)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})}
    return {k: v for k, v in full_env.items() if v is not None}


def qmoe_cli(*args, timeout: float = 300, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    """Run the ``qmoe`` command in a fresh interpreter (the CLI contract: exit status, one-line errors)."""
    return subprocess.run(
        [*QMOE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=_child_env(env), **popen
    )


def qmoe_popen(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*QMOE, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(env)
    )
