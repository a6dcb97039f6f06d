"""The mathematics of the RL family: advantages, policy losses, KL, aggregation, DAPO, TIS.

Pure functions on torch tensors, no state beyond the KL controller, no knowledge of the trainer.
Conventions (all modules): responses `B x T` right padded, `response_mask` `B x T`, group ids
`index` `(B,)`, outcome score on the last valid token; padded slots may hold junk (even NaN)
that never reaches a result or a gradient; NaN/Inf at valid positions raise naming the tensor.

One RL step uses them in this order:

    rewards = kl.apply_kl_in_reward(...)            # optional: KL in the reward
    adv = get_advantage_estimator(name)(rewards, mask, index, AdvantageOptions(...), ...)
    # per micro-batch, inside the forward/backward schedule:
    out = get_policy_loss(name)(logp, old_logp, adv, mask, clip_ratio_low=..., ...)
    mat = actor_loss_matrix(out.loss_mat, mask, is_weights=w, entropy=..., kl=kl_penalty(...))
    loss = aggregate_loss(mat, mask, mode, normaliser=global_normaliser, norm_len=...)

Registries by name (used by `conf/algorithm/*.yaml`): `get_advantage_estimator`,
`get_policy_loss`, `canonical_kl_estimator`, `check_agg_mode`, `make_kl_controller`;
`advantage_options` / `policy_loss_kwargs` / `seq_norm_len` translate an `AlgorithmConfig`.
"""

from mcore_r1.algos.advantages import (
    ADVANTAGE_ESTIMATORS, NEEDS_CRITIC, NEEDS_GREEDY_BASELINE, NEEDS_GROUPS, SINGLETON_POLICIES,
    AdvantageOptions, Advantages, gae_advantage, get_advantage_estimator, grpo_advantage,
    outcome_scores, reinforce_plus_plus_advantage, reinforce_plus_plus_baseline_advantage,
    remax_advantage, rloo_advantage,
)
from mcore_r1.algos.aggregation import AGG_MODES, LossNormaliser, aggregate_loss, check_agg_mode
from mcore_r1.algos.common import check_finite, masked_mean, masked_whiten
from mcore_r1.algos.dapo import (
    DynamicSamplingStats, apply_overlong_penalty, fill_batch, keep_informative, overlong_penalty,
)
from mcore_r1.algos.kl import (
    KL_CONTROLLERS, KL_ESTIMATOR_NAMES, AdaptiveKLController, FixedKLController, apply_kl_in_reward,
    canonical_kl_estimator, kl_penalty, make_kl_controller,
)
from mcore_r1.algos.mismatch import IS_LEVELS, mismatch_metrics, truncated_importance_weights
from mcore_r1.algos.options import advantage_options, policy_loss_kwargs, seq_norm_len, value_clip
from mcore_r1.algos.policy_loss import (
    POLICY_LOSSES, PolicyLossOutput, actor_loss_matrix, cispo_loss, entropy_from_logits,
    get_policy_loss, gspo_loss, gspo_token_loss, ppo_clip_loss, value_loss,
)

__all__ = [
    "actor_loss_matrix", "AdaptiveKLController", "ADVANTAGE_ESTIMATORS", "advantage_options",
    "AdvantageOptions", "Advantages", "AGG_MODES", "aggregate_loss", "apply_kl_in_reward",
    "apply_overlong_penalty", "canonical_kl_estimator", "check_agg_mode", "check_finite",
    "cispo_loss", "DynamicSamplingStats", "entropy_from_logits", "fill_batch", "FixedKLController",
    "gae_advantage", "get_advantage_estimator", "get_policy_loss", "grpo_advantage", "gspo_loss",
    "gspo_token_loss", "IS_LEVELS", "keep_informative", "KL_CONTROLLERS", "KL_ESTIMATOR_NAMES",
    "kl_penalty", "LossNormaliser", "make_kl_controller", "masked_mean", "masked_whiten",
    "mismatch_metrics", "NEEDS_CRITIC", "NEEDS_GREEDY_BASELINE", "NEEDS_GROUPS", "outcome_scores",
    "overlong_penalty", "policy_loss_kwargs", "POLICY_LOSSES", "PolicyLossOutput", "ppo_clip_loss",
    "reinforce_plus_plus_advantage", "reinforce_plus_plus_baseline_advantage", "remax_advantage",
    "rloo_advantage", "seq_norm_len", "SINGLETON_POLICIES", "truncated_importance_weights",
    "value_clip", "value_loss",
]
