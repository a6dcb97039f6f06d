"""KL estimators (values, clamps, gradients), KL in the reward, and the KL controllers."""

import math

import pytest
import torch

from mcore_r1.algos import (
    AdaptiveKLController, FixedKLController, apply_kl_in_reward, canonical_kl_estimator,
    kl_penalty, make_kl_controller,
)
from tests.algos import vectors as v

LOGP = [-1.0, -0.5, -2.0, -0.1, -30.0]
REF = [-1.2, -0.3, -2.0, -3.0, -5.0]


def k3_plain(lp, rf):
    x = min(max(rf - lp, -20.0), 20.0)
    return min(max(math.exp(x) - x - 1, -10.0), 10.0)


@pytest.mark.parametrize("name,reference,plain,grad", [
    ("k1", [0.2, -0.2, 0.0, 2.9, -25.0], lambda lp, rf: lp - rf, lambda lp, rf: 1.0),
    ("abs", [0.2, 0.2, 0.0, 2.9, 25.0], lambda lp, rf: abs(lp - rf),
     lambda lp, rf: math.copysign(1.0, lp - rf) if lp != rf else 0.0),
    ("k2", [0.02, 0.02, 0.0, 4.205, 312.5], lambda lp, rf: 0.5 * (lp - rf) ** 2, lambda lp, rf: lp - rf),
    # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp); 0 where a clamp is active
    ("k3", [0.018731, 0.021403, 0.0, 1.955023, 10.0], k3_plain,
     lambda lp, rf: 1 - math.exp(rf - lp) if rf - lp < 20 else 0.0),
])
def test_estimators_values_clamps_and_gradients(name, reference, plain, grad):
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    kl = kl_penalty(logp, torch.tensor(REF, dtype=torch.float64), name)
    v.assert_close(kl, reference)  # reference 6.9
    v.assert_close(kl, [plain(a, b) for a, b in zip(LOGP, REF)], tol=1e-12)
    kl.sum().backward()
    v.assert_close(logp.grad, [grad(a, b) for a, b in zip(LOGP, REF)], tol=1e-12)


def test_aliases():
    assert [canonical_kl_estimator(n) for n in ("kl", "mse", "low_var_kl", "k3", "full")] == \
        ["k1", "k2", "k3", "k3", "full"]
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; known: k1, kl, abs"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_full_kl_over_the_vocabulary():
    p, q = [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]
    logp = torch.tensor([[[math.log(x) for x in p]] * 2], dtype=torch.float64)  # B=1, T=2, V=3
    ref = torch.tensor([[[math.log(x) for x in q]] * 2], dtype=torch.float64)
    ref[0, 1] = float("nan")  # padded position: junk
    kl = kl_penalty(logp, ref, "full", torch.tensor([[1, 0]]))
    v.assert_close(kl, [[sum(a * math.log(a / b) for a, b in zip(p, q)), 0.0]], tol=1e-12)


def test_padding_junk_and_nan_at_valid_positions():
    logp, ref = v.log_probs(), v.tensor(v.OLD_LOGP)
    kl = kl_penalty(logp, ref, "k3", v.mask())
    kl.sum().backward()
    assert torch.isfinite(kl).all() and (kl[~v.mask()] == 0).all() and (logp.grad[~v.mask()] == 0).all()
    ref[2, 0] = float("-inf")
    with pytest.raises(ValueError, match="ref_log_probs has 1 non-finite"):
        kl_penalty(logp, ref, "k1", v.mask())


def test_kl_in_reward_and_current_kl():
    old = v.tensor(v.OLD_LOGP)
    ref = v.tensor([[v.OLD_LOGP[i][t] - 0.1 * (t + 1) for t in range(v.T)] for i in range(v.B)])
    out = apply_kl_in_reward(v.token_rewards(), old, ref, v.mask(), kl_coef=1e-3, estimator="kl")
    want = [[(v.SCORES[i] if t == v.LENS[i] - 1 else 0.0) - 1e-3 * 0.1 * (t + 1) if v.valid(i, t) else 0.0
             for t in range(v.T)] for i in range(v.B)]
    v.assert_close(out.token_level_rewards, want, tol=1e-12)
    v.assert_close(out.token_level_rewards[0], [-0.0001, -0.0002, -0.0003, 0.9996])  # reference 6.9
    per_seq = [sum(0.1 * (t + 1) for t in range(n)) / n for n in v.LENS]
    v.assert_close(out.current_kl, sum(per_seq) / v.B, tol=1e-12)
    v.assert_close(out.current_kl, 0.191667)


def test_controllers():
    fixed = make_kl_controller("fixed", 0.02)
    fixed.update(5.0, 6)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.02
    up = make_kl_controller("adaptive", 0.001, target_kl=0.1, horizon=10000)
    up.update(0.2, n_steps=6)  # err = clip(1, +-0.2) = 0.2
    v.assert_close(up.value, 0.001 * (1 + 0.2 * 6 / 10000), tol=1e-15)
    v.assert_close(up.value, 0.00100012, tol=1e-12)
    down = AdaptiveKLController(0.001, 0.1, 10000)
    down.update(0.05, n_steps=6)  # err = -0.5 -> -0.2
    v.assert_close(down.value, 0.00099988, tol=1e-12)
    with pytest.raises(ValueError, match="unknown KL controller 'pid'"):
        make_kl_controller("pid", 0.1)
    with pytest.raises(ValueError, match="horizon > 0"):
        AdaptiveKLController(0.1, 0.1, 0)
