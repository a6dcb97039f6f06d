"""Policy losses (to be minimised) as per-token matrices, plus the entropy bonus and value loss.

Every policy loss has one signature so configs pick it by name:

    fn(log_probs, old_log_probs, advantages, response_mask, *,
       clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=None) -> PolicyLossOutput

and returns the `B x T` per-token loss (padding exactly 0) with diagnostics; it does *not*
reduce. Reduction is `aggregation.aggregate_loss`, which owns the global normaliser, so a loss
never has to know how the batch was split. Every aggregation mode is linear in the loss
matrix, so the trainer may add the matrices of several terms first (`actor_loss_matrix`:
policy - entropy_coeff * H + kl_coef * KL) and aggregate once; this equals aggregating each
term with the same mode and summing (verl/EasyR1/OpenRLHF aggregate KL and entropy with the
policy's mode).

The importance ratio is exp(clamp(logp - old_logp, -20, 20)) (verl, EasyR1, OpenRLHF ppo).
Gradients flow through `log_probs` only; `old_log_probs` and `advantages` are constants.
Diagnostics are token means over this micro-batch's valid tokens (weight them by token count
when combining micro-batches).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from mcore_r1.algos.common import as_bool_mask, check_shapes, clean, masked_mean

Tensor = torch.Tensor

LOG_RATIO_CLAMP = 20.0


class PolicyLossOutput(NamedTuple):
    loss_mat: Tensor  # B x T per-token loss, 0 on padding
    metrics: dict  # name -> 0-dim tensor (token mean over valid tokens of this micro-batch)


def _inputs(log_probs, old_log_probs, advantages, response_mask):
    check_shapes(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages,
                 response_mask=response_mask)
    m = as_bool_mask(response_mask)
    return (clean("log_probs", log_probs, m), clean("old_log_probs", old_log_probs, m).detach(),
            clean("advantages", advantages, m).detach(), m)


def _ratio(log_probs: Tensor, old_log_probs: Tensor) -> Tensor:
    return torch.exp(torch.clamp(log_probs - old_log_probs, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _bounds(clip_ratio_low: float, clip_ratio_high: float) -> tuple[float, float]:
    # A ratio is never negative, so clip_ratio_low >= 1 simply means "no lower bound".
    return max(1.0 - clip_ratio_low, 0.0), 1.0 + clip_ratio_high


def ppo_clip_loss(log_probs, old_log_probs, advantages, response_mask, *, clip_ratio_low=0.2,
                  clip_ratio_high=0.2, clip_ratio_c: Optional[float] = None) -> PolicyLossOutput:
    """PPO clipped surrogate (1707.06347) with decoupled range (DAPO clip-higher) and dual clip.

        r = pi / pi_old,  L1 = -A r,  L2 = -A clip(r, 1 - low, 1 + high),  C = max(L1, L2)
        loss = min(C, -A c)  where A < 0 (dual clip, 1912.09729; only if clip_ratio_c is set)
        loss = C             elsewhere

    d loss / d logp = -A r on the active unclipped branch, 0 where a clip is active. verl and
    EasyR1 always apply dual clip (c = 3); OpenRLHF leaves it off; here `None` = off and the
    config supplies c. Metrics: clipfrac = mean(L2 > L1), clipfrac_lower = mean(dual clip
    active), ppo_kl = mean(old_logp - logp).
    """
    logp, old, adv, m = _inputs(log_probs, old_log_probs, advantages, response_mask)
    lo, hi = _bounds(clip_ratio_low, clip_ratio_high)
    ratio = _ratio(logp, old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, lo, hi)
    loss = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(m)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c={clip_ratio_c} must be > 1")
        bound = -adv * clip_ratio_c
        dual_active = (adv < 0) & (loss > bound)
        loss = torch.where(dual_active, bound, loss)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).float(), m),
        "clipfrac_lower": masked_mean(dual_active.float(), m),
        "ppo_kl": masked_mean((old - logp).detach(), m),
    }
    return PolicyLossOutput(loss.masked_fill(~m, 0.0), metrics)


def _sequence_log_ratio(logp: Tensor, old: Tensor, m: Tensor) -> Tensor:
    """(1/|y_i|) sum_t (logp - old_logp): log of GSPO's length-normalised sequence ratio."""
    return (logp - old).masked_fill(~m, 0.0).sum(-1) / m.sum(-1).clamp(min=1)


def _gspo_from_log_ratio(log_s: Tensor, adv: Tensor, m: Tensor, clip_ratio_low, clip_ratio_high,
                         seq_log_ratio: Tensor) -> PolicyLossOutput:
    lo, hi = _bounds(clip_ratio_low, clip_ratio_high)
    s = torch.exp(log_s)
    unclipped = -adv * s
    clipped = -adv * torch.clamp(s, lo, hi)
    loss = torch.maximum(unclipped, clipped)
    nonempty = m.any(-1)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).float(), m),
        "seq_ratio_mean": masked_mean(torch.exp(seq_log_ratio).detach(), nonempty),
        "ppo_kl": masked_mean(-seq_log_ratio.detach(), nonempty),
    }
    return PolicyLossOutput(loss.masked_fill(~m, 0.0), metrics)


def gspo_loss(log_probs, old_log_probs, advantages, response_mask, *, clip_ratio_low=3e-4,
              clip_ratio_high=4e-4, clip_ratio_c=None) -> PolicyLossOutput:
    """GSPO (2507.18071), sequence form: one ratio per response, gradient through its mean.

        s_i = exp((1/|y_i|) sum_t (logp_t - old_t))     (log clamped to +-20, EasyR1)
        loss_it = max(-A_it s_i, -A_it clip(s_i, 1 - low, 1 + high))   on every valid token

    With seq-mean-token-mean (the paper's 1/G sum_i) d loss/d logp_t = -A_i s_i / (|y_i| G)
    when unclipped. Dual clip is not part of GSPO and is ignored (verl; EasyR1 applies it).
    """
    logp, old, adv, m = _inputs(log_probs, old_log_probs, advantages, response_mask)
    seq_lr = _sequence_log_ratio(logp, old, m)
    log_s = torch.clamp(seq_lr, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)[:, None].expand_as(logp)
    return _gspo_from_log_ratio(log_s, adv, m, clip_ratio_low, clip_ratio_high, seq_lr)


def gspo_token_loss(log_probs, old_log_probs, advantages, response_mask, *, clip_ratio_low=3e-4,
                    clip_ratio_high=4e-4, clip_ratio_c=None) -> PolicyLossOutput:
    """GSPO-token (2507.18071): s_it = sg(s_i) * pi(y_t) / sg(pi(y_t)), i.e.

        log s_it = sg(clamp(seq_log_ratio_i, -20, 20)) + logp_t - sg(logp_t)

    Same value as `gspo_loss`; for a per-token advantage it gives each token its own
    gradient -A_it s_i (and for sequence-constant A the same gradients as `gspo_loss` under
    seq-mean-token-mean). verl clamps the log-ratio at 10 from above only; EasyR1 at +-20.
    """
    logp, old, adv, m = _inputs(log_probs, old_log_probs, advantages, response_mask)
    seq_lr = _sequence_log_ratio(logp, old, m)
    anchor = torch.clamp(seq_lr, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).detach()[:, None]
    log_s = anchor + logp - logp.detach()
    return _gspo_from_log_ratio(log_s, adv, m, clip_ratio_low, clip_ratio_high, seq_lr)


def cispo_loss(log_probs, old_log_probs, advantages, response_mask, *, clip_ratio_low=1.0,
               clip_ratio_high=0.28, clip_ratio_c=None) -> PolicyLossOutput:
    """CISPO (MiniMax-M1, 2506.13585): REINFORCE with a clipped, stop-gradient IS weight.

        w = sg(clip(r, 1 - low, 1 + high))        loss_t = -w A logp_t

    Every token keeps the gradient -w A, clipped ones included (unlike PPO). The paper uses
    no lower bound: clip_ratio_low = 1 (verl's convention; any value >= 1 means bound 0).
    EasyR1's example setting clip_ratio_low = 0 is a *floor of 1*, not "no bound".
    The loss value depends on logp itself; compare gradients across implementations.
    """
    logp, old, adv, m = _inputs(log_probs, old_log_probs, advantages, response_mask)
    lo, hi = _bounds(clip_ratio_low, clip_ratio_high)
    ratio = _ratio(logp, old).detach()
    weight = torch.clamp(ratio, lo, hi)
    loss = -weight * adv * logp
    metrics = {
        "clipfrac": masked_mean((weight != ratio).float(), m),
        "ppo_kl": masked_mean((old - logp).detach(), m),
    }
    return PolicyLossOutput(loss.masked_fill(~m, 0.0), metrics)


PolicyLossFn = Callable[..., PolicyLossOutput]

POLICY_LOSSES: dict[str, PolicyLossFn] = {
    "ppo_clip": ppo_clip_loss,
    "gspo": gspo_loss,
    "gspo_token": gspo_token_loss,
    "cispo": cispo_loss,
}


def get_policy_loss(name: str) -> PolicyLossFn:
    """The policy loss registered under `name`; unknown names list the known ones."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; known: {', '.join(POLICY_LOSSES)}") from None


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v per position (over the last dim)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def actor_loss_matrix(policy_loss_mat: Tensor, response_mask: Tensor, *,
                      is_weights: Optional[Tensor] = None,
                      entropy: Optional[Tensor] = None, entropy_coeff: float = 0.0,
                      kl: Optional[Tensor] = None, kl_coef: float = 0.0) -> Tensor:
    """Per-token actor loss: w * policy - entropy_coeff * H + kl_coef * KL.

    w are the (detached) rollout-mismatch importance weights of `mismatch.py`, applied to the
    policy term only (verl). Aggregating this matrix once equals aggregating each term with the
    same mode (verl: `pg_loss - entropy_coeff * agg(H) + kl_loss_coef * agg(kl)`). Terms with
    coefficient 0 are skipped, so their padded junk is never read.
    """
    m = as_bool_mask(response_mask)
    total = policy_loss_mat.masked_fill(~m, 0.0)
    if is_weights is not None:
        total = total * clean("is_weights", is_weights, m).detach()
    if entropy is not None and entropy_coeff:
        total = total - entropy_coeff * clean("entropy", entropy, m)
    if kl is not None and kl_coef:
        total = total + kl_coef * clean("kl", kl, m)
    return total


def value_loss(values, old_values, returns, response_mask, *, clip: Optional[float] = 0.5
               ) -> PolicyLossOutput:
    """PPO critic loss: 0.5 * max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2) per token.

    verl/EasyR1 `compute_value_loss` (the 0.5 factor included); `clip=None` drops the clipped
    branch. Aggregate with the actor's mode. Metric vf_clipfrac = mean(clipped branch larger).
    """
    check_shapes(values=values, old_values=old_values, returns=returns, response_mask=response_mask)
    m = as_bool_mask(response_mask)
    v = clean("values", values, m)
    old = clean("old_values", old_values, m).detach()
    ret = clean("returns", returns, m).detach()
    unclipped = (v - ret) ** 2
    if clip is None:
        loss, frac = unclipped, torch.zeros_like(unclipped)
    else:
        clipped = (torch.clamp(v, old - clip, old + clip) - ret) ** 2
        loss, frac = torch.maximum(unclipped, clipped), (clipped > unclipped).float()
    return PolicyLossOutput((0.5 * loss).masked_fill(~m, 0.0), {"vf_clipfrac": masked_mean(frac, m)})
