"""Figures for ``qmoe compare``: accuracy per task with 95% intervals, and each run's training loss curve."""

from __future__ import annotations

from pathlib import Path

from .io import read_jsonl
from .significance import wilson_interval


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (compare runs headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def accuracy_figure(rows, slugs: list[str], path: Path) -> Path | None:
    """Grouped bars (one group per task, one bar per run) with Wilson 95% error bars; None if nothing scored."""
    plt = pyplot()
    rows = [r for r in rows if any(r.accuracy.get(s) is not None for s in slugs)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(slugs) * len(rows) / 3), 4.2))
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
    ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)


def loss_figure(rows, path: Path) -> Path | None:
    """Training LM loss (without auxiliary losses) against step for every trained run."""
    plt = pyplot()

    curves = {}
    for r in rows:
        points = (
            [
                (m["step"], m.get("lm_loss", m["loss"]))
                for m in read_jsonl(r.run_dir / "metrics.jsonl")
                if m.get("loss") is not None and m.get("step") is not None
            ]
            if r.recipe != "-"
            else []
        )
        if points:
            curves[r.label] = points
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        ax.plot(*zip(*points, strict=False), marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training LM loss")
    ax.set_title("Training loss (auxiliary losses excluded)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
