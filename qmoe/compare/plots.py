"""Every figure of ``qmoe compare``, in one style: accuracy per task with 95% intervals, each run's training
loss curve, and the expert-specialisation figures (numeric-token routing heatmaps, expert load per layer).

Each figure function draws under ``STYLE`` into a ``matplotlib.figure.Figure`` (no pyplot global state and
no GUI backend: compare runs headless) and writes it with ``save_figure``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..io import read_jsonl
from ..rundir import METRICS
from .specialisation import MODULE, RoutingShares, load_cv
from .statistics import wilson_interval

if TYPE_CHECKING:
    from .report import RunResult

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.3,
}
DPI = 110

P = ParamSpec("P")
R = TypeVar("R")


def styled(draw: Callable[P, R]) -> Callable[P, R]:
    """Run a figure function under ``STYLE`` (matplotlib reads its settings as each element is drawn)."""

    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def save_figure(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


@styled
def accuracy_figure(rows: Sequence[RunResult], slugs: list[str], path: Path) -> Path | None:
    """Grouped bars (one group per task, one bar per run) with Wilson 95% error bars; None if nothing scored."""
    rows = [r for r in rows if any(r.accuracy.get(s) is not None for s in slugs)]
    if not rows:
        return None
    fig = Figure(figsize=(max(6.0, 1.6 * len(slugs) * len(rows) / 3), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs, ys, below, above = [], [], [], []
        for j, s in enumerate(slugs):
            acc, n = r.accuracy.get(s), r.n.get(s, 0)
            if acc is None or not n:
                continue
            low, high = wilson_interval(round(acc * n), n)
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(100 * acc)
            below.append(100 * (acc - low))
            above.append(100 * (high - acc))
        ax.bar(xs, ys, width, yerr=[below, above], capsize=2, label=r.label)
    ax.set_xticks(range(len(slugs)), slugs)
    ax.set_ylabel("accuracy % (95% interval)")
    ax.set_title("Accuracy per test set")
    ax.legend(ncol=2)
    return save_figure(fig, path)


@styled
def loss_figure(rows: Sequence[RunResult], path: Path) -> Path | None:
    """Training LM loss (without auxiliary losses) against step for every trained run; None without any."""
    curves = {}
    for r in rows:
        points = (
            [
                (m["step"], m.get("lm_loss", m["loss"]))
                for m in read_jsonl(r.run_dir / METRICS)
                if m.get("loss") is not None and m.get("step") is not None
            ]
            if r.recipe != "-"
            else []
        )
        if points:
            curves[r.label] = points
    if not curves:
        return None
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, points in curves.items():
        ax.plot(*zip(*points, strict=False), marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training LM loss")
    ax.set_title("Training loss (auxiliary losses excluded)")
    ax.legend()
    return save_figure(fig, path)


@styled
def routing_figure(shares: dict[str, RoutingShares], path: Path) -> Path:
    """Per run (row): heatmaps [layer, expert] of the top-1 share of numeric tokens, of all tokens, and their
    difference."""
    fig = Figure(figsize=(13, 3.6 * len(shares)), layout="constrained")
    axes = fig.subplots(len(shares), 3, squeeze=False)
    for row, (label, s) in enumerate(shares.items()):
        panels = [
            (s.numeric, "numeric tokens", "viridis"),
            (s.everything, "all tokens", "viridis"),
            (s.numeric - s.everything, "numeric − all", "coolwarm"),
        ]
        for col, (data, title, cmap) in enumerate(panels):
            ax = axes[row][col]
            ax.grid(False)  # grid lines would cut through the cells
            for axis in (ax.xaxis, ax.yaxis):  # experts and layers are whole numbers
                axis.set_major_locator(MaxNLocator(integer=True))
            lim = float(data.abs().max()) if col == 2 else None
            im = ax.imshow(data.numpy(), aspect="auto", cmap=cmap, vmin=-lim if lim else 0, vmax=lim)
            ax.set_title(f"{label}: {title}")
            ax.set_xlabel("expert")
            ax.set_ylabel(f"layer ({MODULE})")
            fig.colorbar(im, ax=ax, label="share of tokens (top-1)" if col < 2 else "difference in share")
    return save_figure(fig, path)


@styled
def expert_load_figure(shares: dict[str, RoutingShares], path: Path) -> Path:
    """Load imbalance (coefficient of variation of the all-token top-1 share) per layer, one line per run."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, s in shares.items():
        cv = load_cv(s.everything).numpy()
        ax.plot(range(len(cv)), cv, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"layer ({MODULE})")
    ax.set_ylabel("load imbalance (coefficient of variation of top-1 share)")
    ax.set_title("Expert load per layer (0 = perfectly balanced)")
    ax.legend()
    return save_figure(fig, path)
