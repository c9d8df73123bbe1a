"""The paired statistics behind RESULTS.md's "is this difference real" column."""

import json

import pytest

from qmoe.compare.statistics import PairedOutcome, paired_outcome, sign_test_p, wilson_halfwidth, wilson_interval


def test_sign_test_matches_the_binomial_by_hand():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)  # all five discordant pairs one way
    assert sign_test_p(0, 5) == sign_test_p(5, 0)
    # 9 vs 1: P(X <= 1) for Binomial(10, 1/2) = 11/1024, doubled
    assert sign_test_p(9, 1) == pytest.approx(22 / 1024)


def test_wilson_interval_is_about_ten_points_at_n100():
    assert wilson_halfwidth(50, 100) == pytest.approx(0.0960, abs=1e-3)
    assert wilson_halfwidth(0, 100) < wilson_halfwidth(50, 100)
    assert wilson_halfwidth(0, 0) == 0.0
    low, high = wilson_interval(1, 100)  # 1 of 100: the interval is lopsided and never negative
    assert 0.0 < low < 0.01 < high and high == pytest.approx(0.0545, abs=1e-3)
    assert wilson_interval(0, 100)[0] == 0.0


def _eval(path, correct):
    predictions = [{"index": i, "prompt": f"q{i}", "correct": c} for i, c in enumerate(correct)]
    path.write_text(json.dumps({"n": len(correct), "predictions": predictions}))
    return path


def test_paired_outcome_counts_discordant_problems(tmp_path):
    mine = _eval(tmp_path / "mine.json", [True, True, False, False, True])
    ref = _eval(tmp_path / "ref.json", [True, False, True, False, False])
    out = paired_outcome(mine, ref)
    assert (out.n, out.wins, out.losses) == (5, 2, 1)
    assert out.delta == pytest.approx(20.0)
    assert paired_outcome(tmp_path / "missing.json", ref) is None
    pooled = out + PairedOutcome(5, 0, 3)
    assert (pooled.n, pooled.wins, pooled.losses) == (10, 2, 4) and pooled.delta == pytest.approx(-20.0)
    assert pooled.p_value == pytest.approx(sign_test_p(2, 4))
