"""Matplotlib figures for the UI: training curves, expert-load heatmaps, run comparison, token routing.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state), so concurrent requests
never draw into each other's plots.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# an expert's share below this fraction of the uniform share (1/E) counts as collapsed
COLLAPSE_FRACTION = 0.1
# tab10 colours: the same expert has the same colour in every plot and in the token view
EXPERT_COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def expert_color(index: int) -> str:
    return EXPERT_COLORS[index % len(EXPERT_COLORS)]


def short_layer_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``L3 self_attn.q_proj`` (readable tick labels)."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts):
            return f"L{parts[i + 1]} " + ".".join(parts[i + 2 :])
    return name.removeprefix("model.")


def empty_figure(message: str, size=(8, 3)) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="#555")
    ax.set_axis_off()
    return fig


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for rec in records:
        value = rec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(rec.get("step", len(steps)))
            values.append(float(value))
    return steps, values


def training_curves(records: list[dict], title: str = "") -> Figure:
    """Four panels over optimizer steps: losses, auxiliary losses, learning rate, throughput and memory."""
    if not records:
        return empty_figure("no metrics yet: the first line appears after `train.logging_steps` steps", (11, 6))
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    for key, label, style in (("loss", "total loss", "-"), ("lm_loss", "LM loss", "--")):
        steps, values = _series(records, key)
        if values:
            ax.plot(steps, values, style, marker="o", markersize=3, label=label)
    ax.set(title="Training loss", xlabel="step", ylabel="loss (nats/token)")
    ax.legend(loc="best")
    ax = axes[0, 1]
    plotted = False
    for key, label in (("balance_loss", "balance loss"), ("contrastive_loss", "contrastive loss")):
        steps, values = _series(records, key)
        if values and any(v != 0 for v in values):
            ax.plot(steps, values, marker="o", markersize=3, label=label)
            plotted = True
    ax.set(title="Auxiliary losses (unweighted)", xlabel="step", ylabel="loss")
    if plotted:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "none for this method", ha="center", va="center", transform=ax.transAxes, color="#777")
    ax = axes[1, 0]
    steps, values = _series(records, "lr")
    ax.plot(steps, values, color="#9467bd", marker="o", markersize=3)
    ax.set(title="Learning rate", xlabel="step", ylabel="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax = axes[1, 1]
    steps, values = _series(records, "tokens_per_s")
    ax.plot(steps, values, color="#2ca02c", marker="o", markersize=3, label="tokens/s")
    ax.set(title="Throughput and peak memory", xlabel="step", ylabel="throughput (tokens/s)")
    ax.tick_params(axis="y", labelcolor="#2ca02c")
    mem = ax.twinx()
    steps, values = _series(records, "peak_mem_mb")
    mem.plot(steps, values, color="#d62728", linestyle="--", marker="s", markersize=3, label="peak memory")
    mem.set_ylabel("peak memory (MB)", color="#d62728")
    mem.tick_params(axis="y", labelcolor="#d62728")
    if title:
        fig.suptitle(title, fontsize=13)
    return fig


def load_matrix(expert_load: dict[str, list[float]]) -> tuple[list[str], np.ndarray]:
    """Layers (in model order) and their load rows as a [layers, experts] array (ragged rows padded NaN)."""
    names = list(expert_load)
    width = max((len(v) for v in expert_load.values()), default=0)
    matrix = np.full((len(names), width), np.nan)
    for i, name in enumerate(names):
        row = expert_load[name]
        matrix[i, : len(row)] = row
    return names, matrix


def load_heatmap(expert_load: dict[str, list[float]], step, method: str | None = None) -> Figure:
    """Layers × experts heatmap of the fraction of routed tokens (or, for LoRACoE, mean rank weights)."""
    if not expert_load:
        return empty_figure("no expert load recorded (plain LoRA has no router)")
    names, matrix = load_matrix(expert_load)
    coe = method == "loracoe"
    height = min(2.0 + 0.22 * len(names), 30)
    fig = Figure(figsize=(max(6.0, 2.5 + 0.6 * matrix.shape[1]), height), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_xticklabels([str(e) for e in range(matrix.shape[1])])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([short_layer_name(n) for n in names], fontsize=7 if len(names) > 20 else 9)
    ax.set_xlabel("rank (composition expert dimension)" if coe else "expert")
    ax.set_ylabel("adapted layer")
    what = "Mean rank-composition weight" if coe else "Expert load (fraction of tokens)"
    ax.set_title(f"{what} at step {step}")
    if matrix.size <= 160:
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < np.nanmax(matrix) * 0.6 else "black",
                )
    fig.colorbar(image, ax=ax, label="mean weight" if coe else "fraction of routed tokens")
    return fig


def imbalance_rows(expert_load: dict[str, list[float]]) -> list[list]:
    """Per layer: coefficient of variation of the load, the busiest expert's share, and the collapsed
    experts (share below COLLAPSE_FRACTION of the uniform share)."""
    rows = []
    for name, load in expert_load.items():
        values = np.asarray(load, dtype=float)
        if values.size == 0:
            continue
        mean = values.mean()
        cv = float(values.std() / mean) if mean > 0 else float("nan")
        collapsed = [int(i) for i in np.flatnonzero(values < COLLAPSE_FRACTION / values.size)]
        busiest = int(values.argmax())
        rows.append(
            [
                short_layer_name(name),
                round(cv, 3),
                f"{busiest} ({values[busiest]:.0%})",
                ", ".join(map(str, collapsed)) if collapsed else "",
                "collapsed experts" if collapsed else ("imbalanced" if cv > 0.5 else "ok"),
            ]
        )
    return rows


IMBALANCE_HEADERS = ["layer", "coefficient of variation", "busiest expert (share)", "collapsed experts", "flag"]


def imbalance_figure(expert_load: dict[str, list[float]], method: str | None = None) -> Figure:
    """Bar chart of the per-layer coefficient of variation; layers with collapsed experts in red."""
    rows = imbalance_rows(expert_load)
    if not rows:
        return empty_figure("no expert load recorded", (8, 2.5))
    fig = Figure(figsize=(7, min(max(3.5, 1.5 + 0.3 * len(rows)), 30)), layout="constrained")
    ax = fig.add_subplot()
    colors = [
        "#d62728" if r[4] == "collapsed experts" else ("#ff7f0e" if r[4] == "imbalanced" else "#2ca02c") for r in rows
    ]
    ax.barh(range(len(rows)), [r[1] for r in rows], color=colors)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=7 if len(rows) > 20 else 9)
    ax.invert_yaxis()
    ax.axvline(0.5, color="#777", linestyle=":", linewidth=1)
    ax.set_xlabel("coefficient of variation of the load (0 = perfectly balanced)")
    ax.set_title("Per-layer imbalance\n(red: collapsed experts, orange: CV > 0.5)")
    return fig


def compare_curves(runs: dict[str, list[dict]]) -> Figure:
    """Loss curves of several runs overlaid (total loss solid, LM loss dashed)."""
    if not runs:
        return empty_figure("select two or more runs")
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_total, ax_lm = fig.subplots(1, 2, sharey=True)
    for i, (name, records) in enumerate(runs.items()):
        color = EXPERT_COLORS[i % len(EXPERT_COLORS)]
        for ax, key in ((ax_total, "loss"), (ax_lm, "lm_loss")):
            steps, values = _series(records, key)
            if values:
                ax.plot(steps, values, color=color, marker="o", markersize=2, label=name)
    ax_total.set(title="Total loss", xlabel="step", ylabel="loss (nats/token)")
    ax_lm.set(title="LM loss (without auxiliary losses)", xlabel="step")
    ax_total.legend(fontsize=8)
    return fig


def token_heatmap(weights: np.ndarray, layers: list[str], token: str, index: int) -> Figure:
    """Layers × experts routing weights of one token, as recorded during generation."""
    fig = Figure(
        figsize=(max(6.0, 2.5 + 0.6 * weights.shape[1]), min(2.0 + 0.22 * len(layers), 30)), layout="constrained"
    )
    ax = fig.add_subplot()
    image = ax.imshow(
        weights, aspect="auto", cmap="magma", vmin=0, vmax=max(1e-9, float(np.nanmax(weights))), interpolation="nearest"
    )
    ax.set_xticks(range(weights.shape[1]))
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([short_layer_name(n) for n in layers], fontsize=7 if len(layers) > 20 else 9)
    ax.set_ylabel("adapted layer")
    ax.set_title(f"Routing weights of token #{index} {token!r}")
    fig.colorbar(image, ax=ax, label="routing weight")
    return fig
