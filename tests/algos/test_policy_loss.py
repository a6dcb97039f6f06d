"""Policy losses: values against the reference's worked numbers, and autograd gradients with
respect to the log-probs against hand-derived formulas evaluated in plain Python."""

import math
import statistics

import pytest
import torch

from mcore_r1.algos import (
    actor_loss_matrix, aggregate_loss, entropy_from_logits, get_policy_loss, value_loss,
)
from mcore_r1.algos.policy_loss import POLICY_LOSSES
from tests.algos import vectors as v

# Exact GRPO advantages of the common input (unbiased std + 1e-6), computed in plain Python.
ADV = []
for _i, _s in enumerate(v.SCORES):
    _g = [x for x, u in zip(v.SCORES, v.UID) if u == v.UID[_i]]
    ADV.append((_s - statistics.mean(_g)) / (statistics.stdev(_g) + 1e-6))


def advantages():
    return v.tensor(v.per_token(ADV))  # NaN junk in padding


def ppo_oracle(low, high, c):
    """Per-token loss and d loss_tok / d logp by the PPO / dual-clip case analysis."""
    loss, grad = [], []
    for i in range(v.B):
        lrow, grow = [], []
        for t in range(v.T):
            if not v.valid(i, t):
                lrow.append(0.0), grow.append(0.0)
                continue
            a, r = ADV[i], v.RATIO[i][t]
            l1, l2 = -a * r, -a * min(max(r, 1 - low), 1 + high)
            val, g = max(l1, l2), (-a * r if l1 >= l2 else 0.0)
            if c is not None and a < 0 and val > -a * c:
                val, g = -a * c, 0.0
            lrow.append(val), grow.append(g)
        loss.append(lrow), grad.append(grow)
    return loss, grad


def grad_of(loss_name, mode="token-mean", **clip):
    logp = v.log_probs()
    out = get_policy_loss(loss_name)(logp, v.tensor(v.OLD_LOGP), advantages(), v.mask(), **clip)
    loss = aggregate_loss(out.loss_mat, v.mask(), mode)
    loss.backward()
    return out, loss, logp.grad


@pytest.mark.parametrize("low,high,c,ref_loss,ref_row1", [
    (0.2, 0.2, 3.0, 0.368866, [3.464096, 0.923759, 1.154699, 0.0]),  # reference 6.8 PPO
    (0.2, 0.28, 10.0, 0.427668, [4.618794, 0.923759, 1.154699, 0.0]),  # reference 6.8 DAPO
    (0.2, 0.2, None, None, [4.618794, 0.923759, 1.154699, 0.0]),  # dual clip off
])
def test_ppo_clip_values_and_gradients(low, high, c, ref_loss, ref_row1):
    out, loss, grad = grad_of("ppo_clip", clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=c)
    want_loss, want_grad = ppo_oracle(low, high, c)
    v.assert_close(out.loss_mat, want_loss, tol=1e-12)
    v.assert_close(out.loss_mat[1], ref_row1)
    v.assert_close(loss, sum(map(sum, want_loss)) / v.N_VALID, tol=1e-12)
    if ref_loss is not None:
        v.assert_close(loss, ref_loss)
    v.assert_close(grad, [[g / v.N_VALID for g in row] for row in want_grad], tol=1e-12)


def test_ppo_clip_metrics():
    out, _, grad = grad_of("ppo_clip", clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0)
    v.assert_close(out.metrics["clipfrac"], 5 / 17)
    v.assert_close(out.metrics["clipfrac_lower"], 1 / 17)
    v.assert_close(out.metrics["ppo_kl"], -sum(math.log(v.RATIO[i][t]) for i in range(v.B)
                                               for t in range(v.T) if v.valid(i, t)) / 17, tol=1e-12)
    # reference 6.8: gradient of the token-mean loss, row 3
    v.assert_close(grad[3], [0.07647, 0.05, 0.0, 0.147059])


def gspo_oracle(low, high):
    """Sequence ratio s_i and the seq-mean-token-mean gradient -A s / (|y| B) when unclipped."""
    seq = [math.exp(sum(math.log(v.RATIO[i][t]) for t in range(v.LENS[i])) / v.LENS[i])
           for i in range(v.B)]
    loss, grad = [], []
    for i, s in enumerate(seq):
        a = ADV[i]
        l1, l2 = -a * s, -a * min(max(s, 1 - low), 1 + high)
        active = l1 >= l2
        loss.append([max(l1, l2) if v.valid(i, t) else 0.0 for t in range(v.T)])
        grad.append([-a * s / (v.LENS[i] * v.B) if v.valid(i, t) and active else 0.0
                     for t in range(v.T)])
    return seq, loss, grad


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
@pytest.mark.parametrize("low,high,ref_loss", [(3e-4, 4e-4, 0.083170), (0.2, 0.2, 0.040613)])
def test_gspo_values_and_gradients(name, low, high, ref_loss):
    out, loss, grad = grad_of(name, "seq-mean-token-mean", clip_ratio_low=low, clip_ratio_high=high)
    seq, want_loss, want_grad = gspo_oracle(low, high)
    v.assert_close(seq, [1.036682, 1.259921, 1.06066, 1.19975, 1.35, 0.910977])  # reference 6.8
    v.assert_close(out.loss_mat, want_loss, tol=1e-12)
    v.assert_close(loss, ref_loss)
    v.assert_close(grad, want_grad, tol=1e-12)
    v.assert_close(grad[1, 0], 0.080824)


def test_gspo_token_gives_each_token_its_own_advantage():
    # With per-token advantages the token form's gradient is -A_t s / (|y| B) per token.
    adv = v.tensor([[0.5, -1.0, 2.0, 0.1]] * v.B)
    logp = v.log_probs()
    out = get_policy_loss("gspo_token")(logp, v.tensor(v.OLD_LOGP), adv, v.mask(),
                                        clip_ratio_low=10.0, clip_ratio_high=10.0)
    aggregate_loss(out.loss_mat, v.mask(), "seq-mean-token-mean").backward()
    seq, _, _ = gspo_oracle(10.0, 10.0)
    a = [0.5, -1.0, 2.0, 0.1]
    v.assert_close(logp.grad, [[-a[t] * seq[i] / (v.LENS[i] * v.B) if v.valid(i, t) else 0.0
                                for t in range(v.T)] for i in range(v.B)], tol=1e-12)


def test_cispo_keeps_gradients_of_clipped_tokens():
    out, loss, grad = grad_of("cispo", clip_ratio_low=1.0, clip_ratio_high=0.28)
    w = [[min(max(v.RATIO[i][t], 0.0), 1.28) if v.valid(i, t) else 0.0 for t in range(v.T)]
         for i in range(v.B)]
    v.assert_close(w[3], [1.28, 0.85, 0.75, 1.28])  # reference 6.8 CISPO weights
    logp = [[v.OLD_LOGP[i][t] + math.log(v.RATIO[i][t]) for t in range(v.T)] for i in range(v.B)]
    v.assert_close(out.loss_mat, [[-w[i][t] * ADV[i] * logp[i][t] if v.valid(i, t) else 0.0
                                   for t in range(v.T)] for i in range(v.B)], tol=1e-12)
    v.assert_close(loss, 0.341625)
    v.assert_close(grad, [[-w[i][t] * ADV[i] / v.N_VALID for t in range(v.T)] for i in range(v.B)],
                   tol=1e-12)
    v.assert_close(grad[1], [0.086942, 0.033962, 0.067923, 0.0])  # reference 6.8
    # clipfrac: ratios outside [0, 1.28]: 1.5, 4.0, 1.3, 2.5, 1.35 -> 5 of 17
    v.assert_close(out.metrics["clipfrac"], 5 / 17)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_padding_junk_does_not_leak_and_nan_at_valid_positions_is_named(name):
    _, loss, grad = grad_of(name)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[~v.mask()] == 0).all()
    # Large finite junk instead of NaN gives the very same loss.
    logp = v.log_probs(junk=1e9)
    out = get_policy_loss(name)(logp, v.tensor(v.OLD_LOGP, junk=-1e9), v.tensor(v.per_token(ADV), junk=1e9),
                                v.mask())
    v.assert_close(aggregate_loss(out.loss_mat, v.mask()), loss, tol=1e-12)
    for arg in ("log_probs", "old_log_probs", "advantages"):
        inputs = dict(log_probs=v.log_probs(), old_log_probs=v.tensor(v.OLD_LOGP), advantages=advantages())
        inputs[arg] = inputs[arg].detach().clone()
        inputs[arg][0, 1] = float("nan")
        with pytest.raises(ValueError, match=f"^{arg} has 1 non-finite"):
            get_policy_loss(name)(response_mask=v.mask(), **inputs)


def test_all_masked_batch_gives_zero_loss_and_gradient():
    m = torch.zeros(2, 3, dtype=torch.bool)
    logp = torch.full((2, 3), float("nan"), dtype=torch.float64, requires_grad=True)
    for name in POLICY_LOSSES:
        out = get_policy_loss(name)(logp, logp.detach(), torch.zeros(2, 3, dtype=torch.float64), m)
        for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
            loss = aggregate_loss(out.loss_mat, m, mode)
            (g,) = torch.autograd.grad(loss, logp, retain_graph=True)
            assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


def test_entropy_and_actor_loss_matrix_are_linear_in_each_term():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    p = [math.exp(z) / sum(math.exp(u) for u in (1, 2, 3)) for z in (1, 2, 3)]
    v.assert_close(entropy_from_logits(logits), [[-sum(q * math.log(q) for q in p)]], tol=1e-12)
    pg = v.tensor([[0.1 * (i + t) for t in range(v.T)] for i in range(v.B)])
    ent = v.tensor([[0.5 + 0.01 * t for t in range(v.T)] for i in range(v.B)])
    kl = v.tensor([[0.02 * i for t in range(v.T)] for i in range(v.B)])
    total = actor_loss_matrix(pg, v.mask(), entropy=ent, entropy_coeff=0.01, kl=kl, kl_coef=0.1)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        parts = [aggregate_loss(x, v.mask(), mode) for x in (pg, ent, kl)]
        v.assert_close(aggregate_loss(total, v.mask(), mode),
                       parts[0] - 0.01 * parts[1] + 0.1 * parts[2], tol=1e-12)
    # Terms with coefficient 0 are never read (their junk may even be NaN at valid positions).
    bad = torch.full_like(pg, float("nan"))
    v.assert_close(actor_loss_matrix(pg, v.mask(), entropy=bad, kl=bad), pg.nan_to_num(0.0))


def test_value_loss_clipped_branch():
    vals = torch.tensor([[1.0, 0.9, float("nan")]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 3.0]], dtype=torch.float64)
    ret = torch.tensor([[0.0, 1.0, 9.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    out = value_loss(vals, old, ret, m, clip=0.2)
    # token 0: max((1-0)^2, (0.7-0)^2) = 1 -> 0.5; token 1: max(0.01, (0.7-1)^2 = 0.09) -> 0.045
    v.assert_close(out.loss_mat, [[0.5, 0.045, 0.0]], tol=1e-12)
    v.assert_close(out.metrics["vf_clipfrac"], 0.5, tol=1e-12)
    out.loss_mat.sum().backward()
    v.assert_close(vals.grad, [[1.0, 0.0, 0.0]], tol=1e-12)  # d/dV 0.5 (V - G)^2 = V - G


def test_registry():
    assert set(POLICY_LOSSES) == {"ppo_clip", "gspo", "gspo_token", "cispo"}
    with pytest.raises(ValueError, match="unknown policy loss 'vanilla'; known: ppo_clip, gspo"):
        get_policy_loss("vanilla")
    with pytest.raises(ValueError, match="clip_ratio_c=0.5 must be > 1"):
        grad_of("ppo_clip", clip_ratio_c=0.5)
