"""Metrics against hand-computed values (algorithms.md 6.12), and the degenerate cases."""

from __future__ import annotations

from math import comb

import pytest

from mcore_r1.eval.metrics import (accuracy, auroc, brier_score, expected_calibration_error,
                                   mean_pass_at_k, pass_at_k, summarize)

CORRECT = [1, 0, 1, 1, 0, 0, 1, 0]
CONF = [0.92, 0.83, 0.65, 0.97, 0.22, 0.45, 0.55, 0.05]


def test_reference_vector():
    assert accuracy(CORRECT) == 0.5
    # (0.08^2 + 0.83^2 + 0.35^2 + 0.03^2 + 0.22^2 + 0.45^2 + 0.45^2 + 0.05^2) / 8 = 1.2746 / 8
    assert brier_score(CONF, CORRECT) == pytest.approx(0.159325)
    # Bins 0,2,4,5,6,8 hold one sample each; bin 9 holds 0.92 and 0.97 (both correct):
    # (0.05 + 0.22 + 0.45 + 0.45 + 0.35 + 0.83)/8 + (2/8) * |0.945 - 1| = 2.35/8 + 0.11/8
    assert expected_calibration_error(CONF, CORRECT) == pytest.approx(0.3075)
    # Positives {0.92, 0.65, 0.97, 0.55} vs negatives {0.83, 0.22, 0.45, 0.05}: 14 of 16 pairs.
    assert auroc(CONF, CORRECT) == pytest.approx(0.875)


def test_perfect_confidence():
    correct = [1, 0, 1, 0, 0]
    conf = [1.0, 0.0, 1.0, 0.0, 0.0]
    assert brier_score(conf, correct) == 0.0
    assert expected_calibration_error(conf, correct) == 0.0
    assert auroc(conf, correct) == 1.0


def test_constant_confidence():
    correct = [1, 0, 0, 0]          # accuracy 0.25
    conf = [0.25] * 4
    assert brier_score(conf, correct) == pytest.approx((0.75 ** 2 + 3 * 0.25 ** 2) / 4)  # 0.1875
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0)  # calibrated on average
    assert auroc(conf, correct) == 0.5  # every pair tied
    assert expected_calibration_error([0.9] * 4, correct) == pytest.approx(0.65)  # over-confident


def test_ties_edges_and_undefined_auroc():
    # A tie between a correct and a wrong sample counts one half: pairs (0.8 vs 0.8) = 0.5,
    # (0.8 vs 0.1) = 1 -> (0.5 + 1) / 2.
    assert auroc([0.8, 0.8, 0.1], [1, 0, 0]) == pytest.approx(0.75)
    assert auroc([0.3, 0.9], [1, 1]) is None and auroc([0.3, 0.9], [0, 0]) is None
    # Left-closed bins: 0.3 sits in bin 3 with 0.35; 1.0 sits in the last bin with 0.95.
    assert expected_calibration_error([0.3, 0.35], [1, 1]) == pytest.approx(1 - 0.325)
    assert expected_calibration_error([1.0, 0.95], [1, 0]) == pytest.approx(abs(0.975 - 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([1.2], [1])


@pytest.mark.parametrize("k, expected", [(1, 0.4), (2, 0.7), (3, 0.9), (4, 1.0), (5, 1.0)])
def test_pass_at_k_hand_values(k, expected):
    # n = 5, c = 2: pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@3 = 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, k) == pytest.approx(expected)


def test_pass_at_k_matches_binomial_formula_and_averages():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 2) == pytest.approx((0.7 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_summarize():
    out = summarize([[1, 0], [0, 0]], rewards=[1.0, 0.5, 0.0, 0.5], confidence=None, ks=[1, 2])
    assert out == {"num_prompts": 2, "num_samples": 4, "accuracy": 0.25, "mean_reward": 0.5,
                   "brier": None, "ece": None, "auroc": None, "mean_confidence": None,
                   "pass@k": {"1": 0.25, "2": 0.5}}
    with_conf = summarize([[1, 0]], [1.0, 0.0], [0.5, 0.5], ks=[1])
    assert with_conf["brier"] == 0.25 and with_conf["auroc"] == 0.5 and with_conf["ece"] == 0.0
