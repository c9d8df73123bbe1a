"""Paired statistics for differences between runs scored on the same test problems.

Two adapters scored on the same problems disagree only on some of them; whether one is really better
depends on those discordant problems, not on the two accuracies alone. The exact McNemar test (a
two-sided binomial sign test on the discordant pairs) says how often a split at least that lopsided would
happen if both were equally good. With 100-problem test sets a few points of difference are usually noise,
and the results table should say so rather than let a reader rank methods by it. The same pairing gives
the interval on a difference in held-out answer loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value for ``wins`` vs ``losses`` under a fair coin (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilson_halfwidth(correct: int, n: int, z: float = 1.96) -> float:
    """Half-width of the 95% Wilson score interval for ``correct``/``n`` (as a fraction)."""
    if n == 0:
        return 0.0
    p = correct / n
    denom = 1 + z * z / n
    return z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval (low, high) for ``correct``/``n``; stays inside [0, 1], unlike p ± 2σ."""
    if n == 0:
        return 0.0, 1.0
    centre = (correct / n + z * z / (2 * n)) / (1 + z * z / n)
    half = wilson_halfwidth(correct, n, z)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class PairedOutcome:
    n: int = 0  # problems scored by both
    wins: int = 0  # right here, wrong in the reference
    losses: int = 0  # wrong here, right in the reference

    def __add__(self, other: PairedOutcome) -> PairedOutcome:
        return PairedOutcome(self.n + other.n, self.wins + other.wins, self.losses + other.losses)

    @property
    def delta(self) -> float:
        """Accuracy difference in points over the paired problems."""
        return 100.0 * (self.wins - self.losses) / self.n if self.n else 0.0

    @property
    def p_value(self) -> float:
        return sign_test_p(self.wins, self.losses)


def _correct_by_problem(eval_file: Path) -> dict[tuple[int, str], bool]:
    data = json.loads(Path(eval_file).read_text())
    return {(p["index"], p["prompt"]): bool(p["correct"]) for p in data.get("predictions", [])}


def paired_outcome(eval_file: Path, reference_file: Path) -> PairedOutcome | None:
    """Compare two ``eval.json`` files problem by problem; None when either is missing."""
    if not (Path(eval_file).is_file() and Path(reference_file).is_file()):
        return None
    mine, ref = _correct_by_problem(eval_file), _correct_by_problem(reference_file)
    shared = mine.keys() & ref.keys()
    wins = sum(mine[k] and not ref[k] for k in shared)
    losses = sum(ref[k] and not mine[k] for k in shared)
    return PairedOutcome(len(shared), wins, losses)


def paired_nll_difference(mine: dict, reference: dict) -> tuple[float, float] | None:
    """(Δ mean NLL, 95% half-width) of ``mine`` minus ``reference`` over the same problems, token-weighted.

    Both are ``qmoe.compare.heldout.answer_nll`` results; None when they were not measured on the same problems."""
    a, b = mine.get("per_example", []), reference.get("per_example", [])
    if not a or len(a) != len(b) or any(x[1] != y[1] for x, y in zip(a, b, strict=False)):
        return None
    diffs = [x[0] - y[0] for x, y in zip(a, b, strict=False)]
    tokens = sum(x[1] for x in a)
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    return sum(diffs) / tokens, 1.96 * math.sqrt(n * var) / tokens


def nll_halfwidth(result: dict) -> float:
    """95% half-width of a token-weighted mean NLL (``heldout.answer_nll``), problems as the sampled unit: the
    ratio estimator's delta-method variance, the unpaired counterpart of :func:`paired_nll_difference`."""
    rows = result["per_example"]
    tokens = sum(n for _, n in rows)
    mean = sum(s for s, _ in rows) / tokens
    residuals = [s - mean * n for s, n in rows]
    var = sum(r * r for r in residuals) / max(len(rows) - 1, 1)
    return 1.96 * math.sqrt(len(rows) * var) / tokens
