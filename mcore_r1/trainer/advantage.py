"""From a scored rollout batch to the matrices the policy update reads.

Order (the algorithms issue's): outcome score on the last token -> optional DAPO overlong
penalty -> optional KL-in-reward (old vs reference log-probs, fixed or adaptive coefficient) ->
the configured advantage estimator -> optional truncated importance weights for the
rollout/training mismatch. Everything is on the driver, on `B x T` CPU tensors; the
mathematics lives in `mcore_r1.algos`.
"""

from __future__ import annotations

from typing import Optional

import torch

from mcore_r1 import algos
from mcore_r1.trainer.batch import RolloutBatch


def compute_advantages(cfg, batch: RolloutBatch, old: Optional[torch.Tensor],
                       ref: Optional[torch.Tensor],
                       kl_ctrl, baselines: Optional[torch.Tensor] = None,
                       values: Optional[torch.Tensor] = None) -> tuple[dict, torch.Tensor, dict]:
    """(matrices for `train_mini_batch`, returns, metrics). `old` is None for an on-policy
    step (nothing here may read it then: no KL in the reward, no rollout importance weights)."""
    a = cfg.algorithm
    mask = batch.response_mask()
    rewards = batch.token_level_scores()
    metrics: dict[str, float] = {}
    if a.overlong_buffer_len:
        rewards, penalty = algos.apply_overlong_penalty(rewards, mask, cfg.rollout.max_new_tokens,
                                                        a.overlong_buffer_len, a.overlong_penalty_factor)
        metrics["reward/overlong_penalty"] = float(penalty.mean())
    if not a.use_kl_loss and a.kl_coef > 0:
        in_reward = algos.apply_kl_in_reward(rewards, old, ref, mask, kl_ctrl.value, a.kl_estimator)
        rewards = in_reward.token_level_rewards
        metrics.update({"kl/in_reward": in_reward.current_kl, "kl/coef": kl_ctrl.value})
        kl_ctrl.update(in_reward.current_kl, len(batch))
    estimator = algos.get_advantage_estimator(a.advantage_estimator)
    adv = estimator(rewards, mask, batch.group, algos.advantage_options(a), values=values,
                    reward_baselines=baselines)
    matrices = {"old_log_probs": old, "advantages": adv.advantages, "response_mask": mask}
    if ref is not None and a.use_kl_loss:
        matrices["ref_log_probs"] = ref
    if old is not None:  # else on-policy: the update computes them (see `mismatch_metrics`)
        rollout_logp = batch.matrix(batch.rollout_logp)
        weights = algos.truncated_importance_weights(old, rollout_logp, mask, a.rollout_is,
                                                     a.rollout_is_cap)
        if a.rollout_is != "off":
            matrices["is_weights"] = weights.weights
        metrics.update({f"mismatch/{k}": float(v) for k, v in weights.metrics.items()})
    valid = adv.advantages[mask]
    metrics.update({"advantage/mean": float(valid.mean()) if valid.numel() else 0.0,
                    "advantage/abs_mean": float(valid.abs().mean()) if valid.numel() else 0.0})
    return matrices, adv.returns, metrics


def mismatch_metrics(batch: RolloutBatch, old: torch.Tensor) -> dict:
    """Training vs rollout log-prob metrics, for an on-policy step whose old log-probs came
    from the update (the same numbers `compute_advantages` reports from an old-policy pass)."""
    weights = algos.truncated_importance_weights(old, batch.matrix(batch.rollout_logp),
                                                 batch.response_mask(), "off")
    return {f"mismatch/{k}": float(v) for k, v in weights.metrics.items()}
