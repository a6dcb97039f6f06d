"""KL between the policy and the reference model: estimators, KL in the reward, controllers.

Two placements (choose one per run):

* KL in the loss (GRPO): `kl_penalty(log_probs, ref_log_probs, estimator)` on the *current*
  log-probs (gradient flows), added with a constant coefficient to the per-token actor loss
  (`policy_loss.actor_loss_matrix`) and aggregated with the policy's mode.
* KL in the reward (PPO-RLHF, REINFORCE++): `apply_kl_in_reward` subtracts beta * KL_t from
  every valid token's reward, using the rollout-time `old_log_probs` (no gradient), and reports
  the batch KL that the adaptive controller (Ziegler et al. 1909.08593) feeds on.

Estimators follow J. Schulman, "Approximating KL divergence" (2020), on samples from the policy,
with d = logp - ref:  k1 = d,  abs = |d|,  k2 = d^2 / 2,  k3 = exp(-d) - 1 + d.
Clamps follow verl/EasyR1: only k3 is clamped (input -d to [-20, 20], output to [-10, 10]);
OpenRLHF clamps every estimator's output to +-10. `full` is the exact KL over the vocabulary
from full log-prob tensors (EasyR1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mcore_r1.algos.common import as_bool_mask, check_finite, check_shapes, clean, masked_mean

Tensor = torch.Tensor

# Canonical name -> aliases used by verl / EasyR1 / OpenRLHF configs.
KL_ESTIMATORS = {
    "k1": ("k1", "kl"),
    "abs": ("abs",),
    "k2": ("k2", "mse"),
    "k3": ("k3", "low_var_kl"),
    "full": ("full",),
}
_CANONICAL = {alias: name for name, aliases in KL_ESTIMATORS.items() for alias in aliases}
KL_ESTIMATOR_NAMES = tuple(_CANONICAL)
K3_INPUT_CLAMP = 20.0
K3_OUTPUT_CLAMP = 10.0


def canonical_kl_estimator(name: str) -> str:
    """k1/k2/k3/abs/full for any accepted alias; unknown names list the accepted ones."""
    try:
        return _CANONICAL[name]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {name!r}; known: {', '.join(KL_ESTIMATOR_NAMES)}") from None


def kl_penalty(log_probs: Tensor, ref_log_probs: Tensor, estimator: str = "k3",
               response_mask: Tensor | None = None) -> Tensor:
    """Per-token KL estimate of KL(pi || pi_ref), `B x T` (padding 0 when a mask is given).

        k1 (kl)          d = logp - ref
        abs              |d|
        k2 (mse)         d^2 / 2
        k3 (low_var_kl)  clamp(exp(x) - x - 1, -10, 10),  x = clamp(ref - logp, -20, 20)
        full             sum_v p(v) (log p(v) - log p_ref(v)), inputs `B x T x V` log-probs

    k1 is unbiased but can be negative; k3 is unbiased and non-negative with low variance;
    k2's gradient is the unbiased gradient of the KL. Clamps as verl/EasyR1 (k3 only).
    With `response_mask`, padded slots may hold junk and give 0; without it every entry is
    checked and must be finite.
    """
    name = canonical_kl_estimator(estimator)
    check_shapes(log_probs=log_probs, ref_log_probs=ref_log_probs)
    if response_mask is not None:
        m = as_bool_mask(response_mask)
        log_probs, ref_log_probs = clean("log_probs", log_probs, m), clean("ref_log_probs", ref_log_probs, m)
    else:
        m = None
        check_finite("log_probs", log_probs)
        check_finite("ref_log_probs", ref_log_probs)
    if name == "full":
        kl = (log_probs.exp() * (log_probs - ref_log_probs)).sum(-1)
    else:
        diff = log_probs - ref_log_probs
        if name == "k1":
            kl = diff
        elif name == "abs":
            kl = diff.abs()
        elif name == "k2":
            kl = 0.5 * diff.square()
        else:
            x = torch.clamp(-diff, -K3_INPUT_CLAMP, K3_INPUT_CLAMP)
            kl = torch.clamp(torch.exp(x) - x - 1, -K3_OUTPUT_CLAMP, K3_OUTPUT_CLAMP)
    return kl if m is None else kl.masked_fill(~m, 0.0)


class KLInReward(NamedTuple):
    token_level_rewards: Tensor  # scores - beta * kl on valid tokens, 0 on padding
    kl: Tensor  # the per-token KL used (B x T, padding 0)
    current_kl: float  # mean over sequences of the per-sequence token-mean KL


@torch.no_grad()
def apply_kl_in_reward(token_level_scores: Tensor, old_log_probs: Tensor, ref_log_probs: Tensor,
                       response_mask: Tensor, kl_coef: float, estimator: str = "k1") -> KLInReward:
    """R_t = score_t - beta * KL_t on valid tokens (verl/EasyR1 `apply_kl_penalty`).

    `old_log_probs` are the rollout-time log-probs (no gradient). current_kl =
    mean_i(mean_t KL_it), the quantity the adaptive controller targets (verl/EasyR1); update
    the controller with n_steps = number of responses.
    """
    check_shapes(token_level_scores=token_level_scores, old_log_probs=old_log_probs,
                 ref_log_probs=ref_log_probs, response_mask=response_mask)
    m = as_bool_mask(response_mask)
    scores = clean("token_level_scores", token_level_scores, m)
    kl = kl_penalty(old_log_probs, ref_log_probs, estimator, m)
    per_seq = masked_mean(kl, m, dim=-1)
    current = float(per_seq.mean()) if per_seq.numel() else 0.0
    return KLInReward((scores - kl_coef * kl).masked_fill(~m, 0.0), kl, current)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept for a uniform interface)."""


class AdaptiveKLController:
    """Ziegler et al. 2019 (1909.08593), as in verl, EasyR1 and OpenRLHF:

        err = clip(current_kl / target - 1, -0.2, 0.2);  beta <- beta * (1 + err * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target_kl > 0 and horizon > 0 "
                             f"(got {target_kl}, {horizon})")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards the target; n_steps = responses in the batch just trained on."""
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon


KL_CONTROLLERS = ("fixed", "adaptive")


def make_kl_controller(kind: str, kl_coef: float, target_kl: float = 0.1, horizon: int = 10000):
    """`fixed` or `adaptive` controller starting at `kl_coef`."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; known: {', '.join(KL_CONTROLLERS)}")
