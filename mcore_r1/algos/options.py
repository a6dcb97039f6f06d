"""From `AlgorithmConfig` to the keyword arguments of the algos functions, in one place.

The config speaks in user terms (0 = off, 0 = "use the generation limit"); the functions take
explicit values (None = off, a number). Translating here keeps the trainer free of those rules.
"""

from __future__ import annotations

from typing import Any, Optional

from mcore_r1.algos.advantages import AdvantageOptions


def advantage_options(algo: Any) -> AdvantageOptions:
    """`AdvantageOptions` from an `AlgorithmConfig`."""
    return AdvantageOptions(gamma=algo.gamma, lam=algo.lam, norm_by_std=algo.norm_adv_by_std,
                            std_eps=algo.adv_std_eps, singleton=algo.singleton_groups)


def policy_loss_kwargs(algo: Any) -> dict:
    """Clip settings for `get_policy_loss(algo.policy_loss)`; clip_ratio_c 0 means dual clip off."""
    dual: Optional[float] = algo.clip_ratio_c if algo.clip_ratio_c else None
    return dict(clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high,
                clip_ratio_c=dual)


def value_clip(algo: Any) -> Optional[float]:
    """Clip range of `value_loss`; algorithm.value_clip 0 means unclipped (None)."""
    return algo.value_clip if algo.value_clip else None


def seq_norm_len(algo: Any, max_new_tokens: int) -> float:
    """Constant length of `seq-mean-token-sum-norm`: the configured one or the generation limit."""
    return float(algo.seq_norm_len or max_new_tokens)
