"""Advantage estimators against the reference's worked numbers and plain-Python arithmetic."""

import math
import statistics

import pytest
import torch

from mcore_r1.algos import AdvantageOptions, get_advantage_estimator
from mcore_r1.algos.advantages import ADVANTAGE_ESTIMATORS
from tests.algos import vectors as v


def run(name, opts=AdvantageOptions(), rewards=None, mask=None, index=v.UID, **kw):
    fn = get_advantage_estimator(name)
    return fn(v.token_rewards() if rewards is None else rewards,
              v.mask() if mask is None else mask, index, opts, **kw)


def whiten_plain(rows):
    """Plain-Python masked whitening: unbiased variance over valid tokens, eps 1e-8 in the root."""
    xs = [rows[i][t] for i in range(v.B) for t in range(v.T) if v.valid(i, t)]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return [[(rows[i][t] - mean) / math.sqrt(var + 1e-8) if v.valid(i, t) else 0.0
             for t in range(v.T)] for i in range(v.B)]


def test_grpo_matches_reference_and_plain_arithmetic():
    out = run("grpo")
    v.assert_close(out.advantages, v.per_token(v.GRPO_ADV))  # reference 6.1, junk NaN in padding
    plain = []
    for i, s in enumerate(v.SCORES):
        group = [x for x, g in zip(v.SCORES, v.UID) if g == v.UID[i]]
        plain.append((s - statistics.mean(group)) / (statistics.stdev(group) + 1e-6))
    v.assert_close(out.advantages, v.per_token(plain), tol=1e-12)
    assert torch.equal(out.returns, out.advantages)


def test_dr_grpo_drops_the_std():
    out = run("grpo", AdvantageOptions(norm_by_std=False))
    v.assert_close(out.advantages, v.per_token([1 / 3, -2 / 3, 1 / 3, -0.5, 0.5, 0.0]), tol=1e-12)


def test_grpo_near_degenerate_group_uses_unbiased_std_plus_eps():
    r = torch.tensor([[0.0], [0.0], [1e-4]], dtype=torch.float64)
    out = get_advantage_estimator("grpo")(r, torch.ones(3, 1, dtype=torch.bool), [0, 0, 0])
    v.assert_close(out.advantages[:, 0], [-0.567521, -0.567521, 1.135041])  # reference 6.7


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_all_equal_rewards_give_zero_advantage(name):
    r = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.3, 0.7]], dtype=torch.float64)
    m = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)
    out = get_advantage_estimator(name)(r, m, [0, 0, 0, 0])
    # every score is 1 -> nothing to learn; whitening of all zeros stays zero
    assert torch.equal(out.advantages, torch.zeros_like(r))


SINGLETON_CASE = dict(rewards=torch.tensor([[0.7], [1.0], [0.0]], dtype=torch.float64),
                      mask=torch.ones(3, 1, dtype=torch.bool), index=["p", "q", "q"])


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_groups_of_one_raise_by_default(name):
    with pytest.raises(ValueError, match="at least 2 responses per prompt.*1 response"):
        run(name, **SINGLETON_CASE)


@pytest.mark.parametrize("name,policy,expected", [
    ("grpo", "no_baseline", [0.7 / (1 + 1e-6), 0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6)]),
    ("grpo", "zero", [0.0, 0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6)]),
    ("rloo", "no_baseline", [0.7, 1.0, -1.0]),  # verl loop version keeps the raw score
    ("rloo", "zero", [0.0, 1.0, -1.0]),  # verl vectorised version
])
def test_groups_of_one_when_configured(name, policy, expected):
    out = run(name, AdvantageOptions(singleton=policy), **SINGLETON_CASE)
    v.assert_close(out.advantages[:, 0], expected, tol=1e-12)


def test_rloo_leave_one_out():
    plain = []
    for i, s in enumerate(v.SCORES):
        others = [x for j, (x, g) in enumerate(zip(v.SCORES, v.UID)) if g == v.UID[i] and j != i]
        plain.append(s - sum(others) / len(others))
    v.assert_close(plain, [0.5, -1.0, 0.5, -0.75, 0.75, 0.0], tol=1e-12)  # reference 6.2
    v.assert_close(run("rloo").advantages, v.per_token(plain), tol=1e-12)


def test_remax_greedy_baseline():
    out = run("remax", reward_baselines=torch.tensor([1.0, 1, 1, 0, 0, 0], dtype=torch.float64))
    v.assert_close(out.advantages, [[0, 0, 0, 0], [-1, -1, -1, 0], [0, 0, 0, 0], [0, 0, 0, 0],
                                    [1, 0, 0, 0], [0.5, 0.5, 0.5, 0]], tol=1e-12)
    v.assert_close(out.returns, [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0],
                                 [1, 0, 0, 0], [0.5, 0.5, 0.5, 0]], tol=1e-12)
    with pytest.raises(ValueError, match="reward_baselines"):
        run("remax")


def test_remax_uses_returns_to_go_with_per_token_rewards():
    r = torch.tensor([[-0.1, -0.2, 1.0]], dtype=torch.float64)
    out = run("remax", rewards=r, mask=torch.ones(1, 3), index=[0],
              reward_baselines=torch.tensor([0.5], dtype=torch.float64))
    v.assert_close(out.advantages, [[0.7 - 0.5, 0.8 - 0.5, 1.0 - 0.5]], tol=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_whitens_discounted_returns(gamma):
    returns = [[v.SCORES[i] * gamma ** (v.LENS[i] - 1 - t) if v.valid(i, t) else 0.0
                for t in range(v.T)] for i in range(v.B)]
    out = run("reinforce_plus_plus", AdvantageOptions(gamma=gamma))
    v.assert_close(out.returns, returns, tol=1e-12)
    v.assert_close(out.advantages, whiten_plain(returns), tol=1e-12)
    if gamma == 1.0:
        v.assert_close(out.advantages[0, 0], 1.069045)  # reference 6.4
    else:
        v.assert_close(out.advantages[5], [-0.110981, -0.006036, 0.11057, 0.0])


def test_reinforce_plus_plus_baseline():
    centred = [1 / 3, -2 / 3, 1 / 3, -0.5, 0.5, 0.0]
    out = run("reinforce_plus_plus_baseline")
    v.assert_close(out.advantages, whiten_plain(v.per_token(centred)), tol=1e-12)
    v.assert_close(out.advantages[:, 0], [0.955025, -1.310383, 0.955025, -0.932815, 1.332593,
                                          0.199889])  # reference 6.5


def test_gae_reference_vectors_and_junk_values_do_not_leak():
    opts = AdvantageOptions(gamma=1.0, lam=0.95)
    out = run("gae", opts, values=v.tensor(v.VALUES, junk=9.0))
    v.assert_close(out.returns, [[0.956725, 0.9755, 0.99, 1.0], [0.0245, 0.01, 0.0, 0.0],
                                 [0.975, 1.0, 0.0, 0.0], [0.000488, -0.00475, -0.005, 0.0],
                                 [1.0, 0.0, 0.0, 0.0], [0.49525, 0.495, 0.5, 0.0]])
    v.assert_close(out.advantages[0], [1.098489, 0.839275, 0.566418, 0.2792])
    v.assert_close(out.advantages[4], [1.874856, 0.0, 0.0, 0.0])
    # Row 0 by hand: deltas 0.1, 0.1, 0.1, 0.2 -> A = 0.456725, 0.3755, 0.29, 0.2.
    raw0 = [0.456725, 0.3755, 0.29, 0.2]
    v.assert_close(out.returns[0], [a + b for a, b in zip(raw0, v.VALUES[0])])
    other = run("gae", opts, values=v.tensor(v.VALUES, junk=float("nan")))
    assert torch.equal(other.advantages, out.advantages) and torch.equal(other.returns, out.returns)


def test_gae_skips_interior_masked_positions():
    # r = [0, x, 1], V = [0.5, x, 0.2], gamma = lam = 1: A2 = 1 - 0.2 = 0.8, the masked slot
    # is skipped, A0 = (0 + 0.2 - 0.5) + 0.8 = 0.5; returns = A + V = [1.0, 0, 1.0].
    r = torch.tensor([[0.0, 123.0, 1.0]], dtype=torch.float64)
    vals = torch.tensor([[0.5, 77.0, 0.2]], dtype=torch.float64)
    m = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    out = get_advantage_estimator("gae")(r, m, None, values=vals)
    v.assert_close(out.returns, [[1.0, 0.0, 1.0]], tol=1e-12)
    with pytest.raises(ValueError, match="needs values"):
        get_advantage_estimator("gae")(r, m, None)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_fully_masked_row_gives_zero_and_no_nan(name):
    # The empty row still counts as a response scoring 0 in its group (as in verl).
    r = torch.tensor([[3.0, 5.0], [float("nan"), float("nan")], [0.0, 2.0]], dtype=torch.float64)
    m = torch.tensor([[1, 0], [0, 0], [1, 1]], dtype=torch.bool)
    out = get_advantage_estimator(name)(r, m, [0, 0, 0])
    assert torch.isfinite(out.advantages).all()
    assert torch.equal(out.advantages[1], torch.zeros(2, dtype=torch.float64))
    assert out.advantages[0, 1] == 0 and out.advantages[0, 0] != 0


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_nan_at_a_valid_position_is_named(name):
    rewards = v.token_rewards()
    rewards[2, 1] = float("inf")
    with pytest.raises(ValueError, match="token_level_rewards has 1 non-finite"):
        run(name, rewards=rewards, values=v.tensor(v.VALUES),
            reward_baselines=torch.zeros(v.B, dtype=torch.float64))
    if name == "gae":
        values = v.tensor(v.VALUES)
        values[0, 0] = float("nan")
        with pytest.raises(ValueError, match="values has 1 non-finite"):
            run(name, values=values)


def test_registry():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "remax", "reinforce_plus_plus",
                                         "reinforce_plus_plus_baseline"}
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; known: gae, grpo"):
        get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="singleton"):
        AdvantageOptions(singleton="ignore")
