"""Truncated importance sampling between training-engine and rollout-engine log-probs."""

import math

import pytest
import torch

from mcore_r1.algos import actor_loss_matrix, truncated_importance_weights
from tests.algos.vectors import assert_close

NAN = float("nan")
TRAIN = [[-1.0, -0.5, -2.0], [-0.3, -0.2, NAN]]
ROLLOUT = [[-1.5, -0.4, -2.0], [-0.3, -1.5, NAN]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
DIFF = [[0.5, -0.1, 0.0], [0.0, 1.3]]  # train - rollout on valid tokens


def weights(level, cap=2.0):
    return truncated_importance_weights(torch.tensor(TRAIN, dtype=torch.float64),
                                        torch.tensor(ROLLOUT, dtype=torch.float64), MASK, level, cap)


def test_token_level():
    out = weights("token")
    want = [[min(math.exp(d), 2.0) for d in DIFF[0]], [min(math.exp(d), 2.0) for d in DIFF[1]] + [0.0]]
    assert_close(out.weights, want, tol=1e-12)
    assert not out.weights.requires_grad
    assert_close(out.metrics["is_capped_frac"], 1 / 5, tol=1e-12)
    assert_close(out.metrics["is_ratio_max"], math.exp(1.3), tol=1e-12)
    assert_close(out.metrics["is_ratio_mean"], (sum(math.exp(d) for row in DIFF for d in row)) / 5, tol=1e-12)


def test_sequence_level_uses_the_product_of_token_ratios():
    out = weights("sequence")
    w0, w1 = math.exp(0.4), min(math.exp(1.3), 2.0)
    assert_close(out.weights, [[w0, w0, w0], [w1, w1, 0.0]], tol=1e-12)
    assert_close(out.metrics["is_capped_frac"], 2 / 5, tol=1e-12)


def test_off_gives_ones_and_the_metrics_still_report_the_mismatch():
    out = weights("off")
    assert_close(out.weights, [[1, 1, 1], [1, 1, 0]], tol=0)
    d = [-x for row in DIFF for x in row]  # rollout - train
    assert_close(out.metrics["mismatch_k1"], sum(d) / 5, tol=1e-12)
    assert_close(out.metrics["mismatch_k3"], sum(math.exp(-x) - 1 + x for x in d) / 5, tol=1e-12)
    assert_close(out.metrics["mismatch_abs_max"], 1.3, tol=1e-12)
    assert_close(out.metrics["train_ppl"], math.exp(4.0 / 5), tol=1e-12)


def test_bad_arguments_and_nan_are_named():
    with pytest.raises(ValueError, match="unknown importance-sampling level 'seq'; known: off, token"):
        weights("seq")
    with pytest.raises(ValueError, match="cap=0"):
        weights("token", cap=0)
    bad = torch.tensor(TRAIN, dtype=torch.float64)
    bad[0, 0] = NAN
    with pytest.raises(ValueError, match="train_log_probs has 1 non-finite"):
        truncated_importance_weights(bad, torch.tensor(ROLLOUT, dtype=torch.float64), MASK)


def test_weights_reweight_only_the_policy_term():
    w = weights("token").weights
    pg = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]], dtype=torch.float64)
    kl = torch.full_like(pg, 0.5)
    got = actor_loss_matrix(pg, MASK, is_weights=w, kl=kl, kl_coef=0.1)
    want = [[1.0 * w[0, 0] + 0.05, 2.0 * w[0, 1] + 0.05, 3.0 * w[0, 2] + 0.05],
            [4.0 * w[1, 0] + 0.05, 5.0 * 2.0 + 0.05, 0.0]]
    assert_close(got, want, tol=1e-12)
