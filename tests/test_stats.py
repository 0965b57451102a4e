"""The report's statistics against values computed by hand (telepathy/stats.py)."""

import pytest

from telepathy import stats


def test_wilson_interval():
    # 8 of 10: p = 0.8, z^2/n = 0.38415; centre (0.8 + 0.19207) / 1.38415, half 1.96 sqrt(0.016 + 0.0096) / 1.38415
    assert stats.wilson(8, 10) == pytest.approx((0.49016, 0.94332), abs=5e-5)
    # none right of 16: the interval still has width (the normal approximation would give [0, 0])
    assert stats.wilson(0, 16) == pytest.approx((0.0, 0.19361), abs=5e-5)
    lo, hi = stats.wilson(16, 16)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.19361, abs=5e-5)


def test_exact_mcnemar_is_the_binomial_on_discordant_pairs():
    # b = 10, c = 2: p = 2 P(X <= 2), X ~ Bin(12, 1/2) = 2 (1 + 12 + 66) / 4096
    assert stats.mcnemar(10, 2) == pytest.approx(158 / 4096)
    assert stats.mcnemar(2, 10) == stats.mcnemar(10, 2)
    assert stats.mcnemar(0, 12) == pytest.approx(2 / 4096)
    assert stats.mcnemar(3, 3) == 1.0 and stats.mcnemar(0, 0) == 1.0  # no discordant pair: no evidence


def test_holm_step_down():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06 (input order kept)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([]) == []


def test_interval_over_seeds_is_a_t_interval():
    # The paper's SST-2 K=32 "93.7 +- 0.3" from two seeds: s = 0.3253, t(0.975, 1) = 12.706, half-width 2.92
    lo, hi = stats.seed_interval([93.92, 93.46])
    assert (lo, hi) == pytest.approx((93.69 - 2.9226, 93.69 + 2.9226), abs=2e-3)
    assert stats.seed_interval([90.0]) is None


def test_seeds_that_disagree_or_split_are_flagged():
    trec_k8 = [35.4, 83.8, 61.2, 41.4, 85.8]  # the original's TREC at K=8
    flags = stats.disagreement(trec_k8)
    assert flags == ["seeds disagree: 50.4 pp between best and worst", "two modes: 3 seed(s) near 46.0, 2 near 84.8"]
    assert stats.disagreement([93.92, 93.46]) == [] and stats.disagreement([90.2, 85.6]) == []  # 4.6 pp
    assert stats.disagreement([90.2, 80.0]) == ["seeds disagree: 10.2 pp between best and worst"]  # two: no modes
    assert stats.disagreement([70.0]) == []
