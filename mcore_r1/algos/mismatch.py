"""Rollout/training mismatch: truncated importance sampling (TIS) and mismatch metrics.

vLLM samples with its own kernels and precision, so the rollout engine's probabilities
pi_rollout differ from the training engine's pi_train for the same weights. The policy
gradient is an expectation under pi_train (through old_log_probs recomputed by Megatron) but
the samples come from pi_rollout. Truncated importance sampling (Yao et al., "Your efficient RL
framework secretly brings you off-policy RL training", 2025; verl `rollout_is`) reweights
each token's policy loss by

    token level:     w_t = min(pi_train(y_t) / pi_rollout(y_t), cap)
    sequence level:  w_i = min(prod_t pi_train(y_t) / pi_rollout(y_t), cap)   on all tokens of i

computed from `old_log_probs` (training engine, before the update) and the rollout
log-probs, detached. The trainer passes `w` to `policy_loss.actor_loss_matrix(is_weights=w)`,
which reweights the per-token policy loss before aggregation (KL and entropy terms are not
reweighted, as in verl). It is off by default; the
metrics are worth logging either way, since a growing mismatch means the rollout engine and
the trainer disagree (dtype, kernels, or a failed weight refit).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mcore_r1.algos.common import as_bool_mask, check_shapes, clean, masked_mean

Tensor = torch.Tensor

IS_LEVELS = ("off", "token", "sequence")
_LOG_CLAMP = 20.0


class ImportanceWeights(NamedTuple):
    weights: Tensor  # B x T, detached, 0 on padding (ones on valid tokens when level = off)
    metrics: dict  # name -> float


@torch.no_grad()
def mismatch_metrics(train_log_probs: Tensor, rollout_log_probs: Tensor, response_mask: Tensor) -> dict:
    """Token means over valid tokens of how far the two engines' log-probs are apart.

    mismatch_k1 = mean(log pi_rollout - log pi_train) and mismatch_k3 (non-negative) estimate
    KL(pi_rollout || pi_train) on the rollout's samples; *_ppl = exp(-mean log-prob);
    mismatch_abs_max is the largest |difference| on any valid token.
    """
    m = as_bool_mask(response_mask)
    train = clean("train_log_probs", train_log_probs, m)
    rollout = clean("rollout_log_probs", rollout_log_probs, m)
    diff = rollout - train
    k3 = torch.exp(-diff) - 1 + diff
    return {
        "mismatch_k1": float(masked_mean(diff, m)),
        "mismatch_k3": float(masked_mean(k3, m)),
        "mismatch_abs_max": float(diff.abs().max()) if diff.numel() else 0.0,
        "train_ppl": float(torch.exp(-masked_mean(train, m))),
        "rollout_ppl": float(torch.exp(-masked_mean(rollout, m))),
    }


@torch.no_grad()
def truncated_importance_weights(train_log_probs: Tensor, rollout_log_probs: Tensor,
                                 response_mask: Tensor, level: str = "token",
                                 cap: float = 2.0) -> ImportanceWeights:
    """Truncated IS weights (see the module docstring) and their metrics.

    Log-ratios are clamped to +-20 before exp (sequence products overflow otherwise).
    Metrics: is_ratio_mean / is_ratio_max before truncation, is_capped_frac (share of valid
    tokens whose weight was truncated), plus `mismatch_metrics`.
    """
    if level not in IS_LEVELS:
        raise ValueError(f"unknown importance-sampling level {level!r}; known: {', '.join(IS_LEVELS)}")
    if cap <= 0:
        raise ValueError(f"importance-sampling cap={cap} must be > 0")
    check_shapes(train_log_probs=train_log_probs, rollout_log_probs=rollout_log_probs,
                 response_mask=response_mask)
    m = as_bool_mask(response_mask)
    metrics = mismatch_metrics(train_log_probs, rollout_log_probs, m)
    if level == "off":
        return ImportanceWeights(m.to(train_log_probs.dtype), metrics)
    log_ratio = (clean("train_log_probs", train_log_probs, m)
                 - clean("rollout_log_probs", rollout_log_probs, m))
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)
    ratio = torch.exp(torch.clamp(log_ratio, -_LOG_CLAMP, _LOG_CLAMP)).masked_fill(~m, 0.0)
    weights = torch.clamp(ratio, max=cap)
    metrics.update(
        is_ratio_mean=float(masked_mean(ratio, m)),
        is_ratio_max=float(ratio.max()) if ratio.numel() else 0.0,
        is_capped_frac=float(masked_mean((ratio > cap).to(ratio.dtype), m)),
    )
    return ImportanceWeights(weights, metrics)
