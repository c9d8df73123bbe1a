"""Expert specialisation from routing telemetry (MoELoRA paper §5.2): where numeric tokens go.

Teacher-forced forwards over GSM8K test question+answer pairs, with routing traces on, give every token's
real routing weights at every layer. Per transformer layer: the share of numeric tokens (tokens whose text
holds a digit) and of all tokens sent to each expert as top-1, and each layer's load imbalance. The figures
drawn from these are in ``plots.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..chat import ChatModel
    from .report import RunResult

MODULE = "mlp.down_proj"  # one projection type gives one row per transformer layer


@dataclass
class RoutingShares:
    """One run's top-1 routing over the GSM8K texts, each share [layers, experts]."""

    numeric: torch.Tensor  # share of the numeric tokens per expert
    everything: torch.Tensor  # share of all tokens per expert
    numeric_tokens: int


def routing_by_token(
    chat: ChatModel, texts: list[str], module: str = MODULE
) -> tuple[list[str], dict[int, torch.Tensor]]:
    """(tokens [str], {layer index: weights [tokens, experts]}) over ``texts`` for layers ending in ``module``."""
    from ..routing import routing, trace_routing

    model, tok = chat.model, chat.tokenizer
    tokens: list[str] = []
    per_layer: dict[int, list[torch.Tensor]] = {}
    device = next(model.parameters()).device
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids.to(device)
        with trace_routing(model), torch.no_grad():
            model(input_ids=ids)
            info = routing(model)
        tokens += [tok.decode([i]) for i in ids[0].tolist()]
        for name, layer_info in info.items():
            if name.endswith(module):
                index = int(name.split("layers.")[1].split(".")[0])
                per_layer.setdefault(index, []).append(torch.cat(layer_info["trace"]))
    return tokens, {i: torch.cat(w) for i, w in sorted(per_layer.items())}


def top1_shares(weights: dict[int, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """[layers, experts]: share of the masked tokens whose top-1 expert is e, per layer."""
    rows = []
    for w in weights.values():
        top = w[mask].argmax(-1)
        counts = torch.bincount(top, minlength=w.shape[1]).float()
        rows.append(counts / counts.sum().clamp(min=1))
    return torch.stack(rows)


def load_cv(shares: torch.Tensor) -> torch.Tensor:
    """[layers]: coefficient of variation of each layer's expert shares (0 = balanced)."""
    return shares.std(1, unbiased=False) / shares.mean(1)


def summarise(numeric: torch.Tensor, everything: torch.Tensor, n_numeric: int) -> dict:
    """Per-run numbers behind the figures, averaged over layers (inputs are [layers, experts] top-1 shares).

    ``numeric_vs_all_tv``: total-variation distance between where numeric tokens and all tokens go (0 = numbers
    are routed like any token; 1 = to disjoint experts). ``numeric_top_share``: share of numeric tokens taken
    by each layer's busiest expert (1/E = spread evenly). ``load_cv``: coefficient of variation of the
    all-token load (0 = balanced)."""
    experts = everything.shape[1]
    return {
        "numeric_tokens": n_numeric,
        "experts": experts,
        "numeric_vs_all_tv": float(0.5 * (numeric - everything).abs().sum(1).mean()),
        "numeric_top_share": float(numeric.max(1).values.mean()),
        "load_cv": float(load_cv(everything).mean()),
    }


def untrained_chat(run_dir: Path) -> ChatModel:
    """The run's backbone with its adapter freshly attached under the run's seed, before any training step:
    the baseline that says how much of the routing pattern the router learned and how much it inherits
    from the backbone's hidden states (B = 0, so those are the base model's)."""
    from transformers import set_seed

    from ..attach import attach
    from ..chat import load_chat_model
    from ..config import AdapterConfig
    from ..recipe import load_recipe

    recipe = load_recipe(run_dir)
    set_seed(recipe.train.seed)  # the order qmoe finetune uses: seed, load, attach
    chat = load_chat_model(
        None,
        base_source=recipe.model.source,
        quantization=recipe.model.quantization,
        compute_dtype=recipe.model.compute_dtype,
    )
    attach(chat.model, AdapterConfig(**recipe.adapter.to_dict()))
    chat.model.eval()
    return chat


def measure_specialisation(runs: Sequence[RunResult], n_examples: int = 40) -> dict[str, RoutingShares]:
    """``{label: RoutingShares}`` for the first run's router before training (the baseline), then every run
    (MoELoRA runs: their routers are what is measured); empty without runs."""
    from ..chat import load_chat_model
    from ..data import chat_prompt, load_gsm8k

    if not runs:
        return {}
    records = load_gsm8k("test", limit=n_examples)
    sources: list[tuple[str, Callable[[], ChatModel]]] = [
        (f"{runs[0].label} (untrained router)", lambda: untrained_chat(runs[0].run_dir))
    ]
    sources += [(run.label, lambda run=run: load_chat_model(run.run_dir)) for run in runs]
    shares = {}
    for label, load in sources:
        chat = load()
        # the training format: chat-templated question followed by the worked answer
        texts = [chat_prompt(chat.tokenizer, r["prompt"]) + r["target"] for r in records]
        tokens, weights = routing_by_token(chat, texts)
        numeric = torch.tensor([any(c.isdigit() for c in t) for t in tokens])
        everything = torch.ones_like(numeric)
        shares[label] = RoutingShares(
            top1_shares(weights, numeric), top1_shares(weights, everything), int(numeric.sum())
        )
        del chat
    return shares
