"""Advantage estimators: token rewards (+ values / baselines) -> per-token advantages and returns.

Every estimator has the same signature so the trainer can pick one by name:

    fn(token_level_rewards, response_mask, index, opts=AdvantageOptions(), *,
       values=None, reward_baselines=None) -> Advantages(advantages, returns)

* `token_level_rewards` (B x T): the outcome score sits on the last valid token; KL-in-reward
  adds `-beta * kl_t` on every valid token (see `kl.apply_kl_in_reward`). Outcome estimators
  use the masked row sum as the scalar score, so per-token KL penalties are summed into it
  (verl/EasyR1 convention).
* Outputs are `B x T` with padding exactly 0, whatever junk the padded inputs held.
* They run under `torch.no_grad()`: advantages are constants for the policy loss.

Disputed choices, each an explicit option in `AdvantageOptions` (defaults follow verl/EasyR1):
group std is the unbiased one (`torch.std`), eps is added to the std (`(s - mean)/(std + eps)`,
eps 1e-6); global whitening uses the unbiased variance with eps inside the root; groups of one
response raise unless `singleton` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from mcore_r1.algos.common import as_bool_mask, check_finite, check_shapes, clean, group_ids, masked_whiten

Tensor = torch.Tensor

SINGLETON_POLICIES = ("error", "zero", "no_baseline")


@dataclass(frozen=True)
class AdvantageOptions:
    """Knobs of the estimators (only the relevant ones are read by each)."""

    gamma: float = 1.0  # discount (gae, reinforce_plus_plus)
    lam: float = 1.0  # GAE lambda
    norm_by_std: bool = True  # grpo: divide by the group std; False = Dr.GRPO
    std_eps: float = 1e-6  # grpo: A = (s - mean) / (std + std_eps)
    whiten_eps: float = 1e-8  # global whitening: rsqrt(var + whiten_eps)
    # Groups with a single response: "error" (EasyR1, OpenRLHF), "zero" (advantage 0; verl
    # vectorised RLOO), "no_baseline" (baseline 0 and std 1, i.e. A = s / (1 + eps); verl loops).
    singleton: str = "error"

    def __post_init__(self):
        if self.singleton not in SINGLETON_POLICIES:
            raise ValueError(f"singleton={self.singleton!r}; known: {', '.join(SINGLETON_POLICIES)}")


class Advantages(NamedTuple):
    advantages: Tensor  # B x T, padding 0
    returns: Tensor  # B x T, padding 0 (value-function targets for gae)


def outcome_scores(token_level_rewards: Tensor, response_mask: Tensor) -> Tensor:
    """s_i = sum_t R[i, t] * M[i, t]: the scalar score of each response (padding ignored)."""
    return clean("token_level_rewards", token_level_rewards, response_mask).sum(-1)


class _Groups(NamedTuple):
    ids: Tensor  # (B,) dense group id
    count: Tensor  # (B,) size of the response's group
    mean: Tensor  # (B,) group mean of the scores
    std: Tensor  # (B,) unbiased group std (0 for singletons)


def _group_stats(scores: Tensor, index) -> _Groups:
    ids = group_ids(index).to(scores.device)
    if ids.numel() != scores.numel():
        raise ValueError(f"index has {ids.numel()} entries for {scores.numel()} responses")
    n_groups = int(ids.max()) + 1 if ids.numel() else 0
    counts = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, ids, torch.ones_like(scores))
    sums = torch.zeros_like(counts).index_add_(0, ids, scores)
    mean = (sums / counts)[ids]
    sq = torch.zeros_like(counts).index_add_(0, ids, (scores - mean) ** 2)
    # Bessel's correction (ddof = 1) as torch.std does in every reference implementation.
    var = sq / (counts - 1).clamp(min=1)
    return _Groups(ids, counts[ids], mean, var.sqrt()[ids])


def _singleton_guard(groups: _Groups, opts: AdvantageOptions, estimator: str) -> Tensor:
    """Bool (B,) of responses alone in their group; raise when the policy is "error"."""
    alone = groups.count == 1
    if opts.singleton == "error" and bool(alone.any()):
        raise ValueError(
            f"{estimator} needs at least 2 responses per prompt, but {int(alone.sum())} response(s) "
            "are alone in their group; raise rollout.n or set algorithm.singleton_groups to "
            "'zero' or 'no_baseline'"
        )
    return alone


def _broadcast(per_seq: Tensor, mask: Tensor) -> Tensor:
    """(B,) -> B x T, the value on every valid token and 0 on padding."""
    m = as_bool_mask(mask)
    return per_seq[:, None].expand(m.shape).masked_fill(~m, 0.0)


def _validate(rewards: Tensor, mask: Tensor, *others: tuple[str, Optional[Tensor]]) -> None:
    check_shapes(token_level_rewards=rewards, response_mask=mask, **{n: t for n, t in others})


@torch.no_grad()
def grpo_advantage(token_level_rewards, response_mask, index, opts=AdvantageOptions(), *,
                   values=None, reward_baselines=None) -> Advantages:
    """GRPO outcome advantage (DeepSeekMath 2402.03300), broadcast to every valid token.

        A_i = (s_i - mean_g(s)) / (std_g(s) + std_eps)    if opts.norm_by_std
        A_i =  s_i - mean_g(s)                             otherwise (Dr.GRPO, 2503.20783)

    std is unbiased (ddof = 1) and eps (1e-6) is added to it: verl / EasyR1 loop version
    (OpenRLHF uses eps 1e-9, verl's vectorised version floors the variance at 1e-6 instead).
    All-equal groups give A = 0. Singleton groups follow `opts.singleton` ("no_baseline" =
    verl's mean 0 / std 1). Returns equal the advantages.
    """
    _validate(token_level_rewards, response_mask)
    scores = outcome_scores(token_level_rewards, response_mask)
    groups = _group_stats(scores, index)
    alone = _singleton_guard(groups, opts, "grpo")
    mean = groups.mean.masked_fill(alone, 0.0)
    adv = scores - mean
    if opts.norm_by_std:
        adv = adv / (groups.std.masked_fill(alone, 1.0) + opts.std_eps)
    if opts.singleton == "zero":
        adv = adv.masked_fill(alone, 0.0)
    adv = _broadcast(adv, response_mask)
    return Advantages(adv, adv.clone())


@torch.no_grad()
def rloo_advantage(token_level_rewards, response_mask, index, opts=AdvantageOptions(), *,
                   values=None, reward_baselines=None) -> Advantages:
    """REINFORCE leave-one-out (2402.14740): A_i = s_i - (sum_g(s) - s_i) / (n_g - 1).

    Equal to n/(n-1) (s_i - mean_g). Singletons follow `opts.singleton` ("no_baseline" keeps
    the raw score, as verl's loop version; "zero" as verl's vectorised one). All frameworks
    agree otherwise. Returns equal the advantages.
    """
    _validate(token_level_rewards, response_mask)
    scores = outcome_scores(token_level_rewards, response_mask)
    groups = _group_stats(scores, index)
    alone = _singleton_guard(groups, opts, "rloo")
    others_mean = (groups.mean * groups.count - scores) / (groups.count - 1).clamp(min=1)
    adv = scores - others_mean.masked_fill(alone, 0.0)
    if opts.singleton == "zero":
        adv = adv.masked_fill(alone, 0.0)
    adv = _broadcast(adv, response_mask)
    return Advantages(adv, adv.clone())


def _reverse_discounted_cumsum(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1}, restarted after every padded slot (right padding)."""
    m = as_bool_mask(mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running.masked_fill(~m[:, t], 0.0)
    return returns.masked_fill(~m, 0.0)


@torch.no_grad()
def remax_advantage(token_level_rewards, response_mask, index=None, opts=AdvantageOptions(), *,
                    values=None, reward_baselines=None) -> Advantages:
    """ReMax (2310.10505): baseline = reward of the greedy response to the same prompt.

        G_t = sum_{s >= t} R_s        A_t = G_t - b_i        (valid tokens)

    `reward_baselines` (B,) is the greedy response's score repeated for each sample. This is
    verl's returns-to-go form; EasyR1 puts the whole sequence sum on every token. They agree
    for outcome-only rewards and differ per token when KL-in-reward adds per-token penalties.
    """
    if reward_baselines is None:
        raise ValueError("remax needs reward_baselines: the score of a greedy rollout per response")
    _validate(token_level_rewards, response_mask)
    check_finite("reward_baselines", reward_baselines)
    if reward_baselines.shape != token_level_rewards.shape[:1]:
        raise ValueError(f"reward_baselines has shape {tuple(reward_baselines.shape)}, expected "
                         f"({token_level_rewards.shape[0]},)")
    rewards = clean("token_level_rewards", token_level_rewards, response_mask)
    returns = _reverse_discounted_cumsum(rewards, response_mask, 1.0)
    adv = returns - _broadcast(reward_baselines.to(returns.dtype), response_mask)
    return Advantages(adv, returns)


@torch.no_grad()
def reinforce_plus_plus_advantage(token_level_rewards, response_mask, index=None,
                                  opts=AdvantageOptions(), *, values=None,
                                  reward_baselines=None) -> Advantages:
    """REINFORCE++ (2501.03262): discounted returns whitened over the whole batch.

        G_t = sum_{s >= t} gamma^(s-t) R_s        A = whiten_M(G)

    Whitening: mean and unbiased variance over all valid tokens of the batch,
    (G - mean) / sqrt(var + whiten_eps), padding re-masked to 0 (verl). OpenRLHF uses the
    biased variance. The statistics are over tokens, so long responses weigh more.
    Returns are the un-whitened G.
    """
    _validate(token_level_rewards, response_mask)
    rewards = clean("token_level_rewards", token_level_rewards, response_mask)
    returns = _reverse_discounted_cumsum(rewards, response_mask, opts.gamma)
    return Advantages(masked_whiten(returns, response_mask, opts.whiten_eps), returns)


@torch.no_grad()
def reinforce_plus_plus_baseline_advantage(token_level_rewards, response_mask, index,
                                           opts=AdvantageOptions(), *, values=None,
                                           reward_baselines=None) -> Advantages:
    """REINFORCE++-baseline: subtract the group mean, then whiten over the batch's tokens.

        x_i = s_i - mean_g(s)        A = whiten_M(x broadcast to tokens)

    verl `reinforce_plus_plus_baseline` (unbiased variance, eps 1e-8 inside the root, re-masked);
    OpenRLHF `reinforce_baseline` uses the biased variance. Returns are x on valid tokens.
    """
    _validate(token_level_rewards, response_mask)
    scores = outcome_scores(token_level_rewards, response_mask)
    groups = _group_stats(scores, index)
    alone = _singleton_guard(groups, opts, "reinforce_plus_plus_baseline")
    centred = scores - groups.mean.masked_fill(alone, 0.0)
    if opts.singleton == "zero":
        centred = centred.masked_fill(alone, 0.0)
    centred = _broadcast(centred, response_mask)
    return Advantages(masked_whiten(centred, response_mask, opts.whiten_eps), centred)


@torch.no_grad()
def gae_advantage(token_level_rewards, response_mask, index=None, opts=AdvantageOptions(), *,
                  values=None, reward_baselines=None) -> Advantages:
    """Generalised advantage estimation (1506.02438) with a critic's `values` (B x T).

        delta_t = r_t + gamma V_{t'} - V_t      A_t = delta_t + gamma lam A_{t'}
        returns = A + V (raw A),                advantages = whiten_M(A)

    t' is the next *valid* position: masked slots are skipped and carry the recursion, as verl
    does (OpenRLHF zeroes them instead; both agree for right padding). Advantages are whitened
    over the batch's valid tokens (unbiased variance, verl/EasyR1). Padding is 0 in both outputs
    (verl leaves V in the padded returns).
    """
    if values is None:
        raise ValueError("gae needs values from a critic (algorithm.use_critic=true)")
    _validate(token_level_rewards, response_mask, ("values", values))
    rewards = clean("token_level_rewards", token_level_rewards, response_mask)
    values = clean("values", values, response_mask).to(rewards.dtype)
    m = as_bool_mask(response_mask)
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + opts.gamma * next_value - values[:, t]
        candidate = delta + opts.gamma * opts.lam * last_gae
        next_value = torch.where(m[:, t], values[:, t], next_value)
        last_gae = torch.where(m[:, t], candidate, last_gae)
        adv[:, t] = last_gae
    adv = adv.masked_fill(~m, 0.0)
    returns = (adv + values).masked_fill(~m, 0.0)
    return Advantages(masked_whiten(adv, m, opts.whiten_eps), returns)


AdvantageFn = Callable[..., Advantages]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "gae": gae_advantage,
    "grpo": grpo_advantage,
    "rloo": rloo_advantage,
    "remax": remax_advantage,
    "reinforce_plus_plus": reinforce_plus_plus_advantage,
    "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline_advantage,
}

# Estimators that need extra inputs from the trainer (used by the config validator).
NEEDS_CRITIC = frozenset({"gae"})
NEEDS_GREEDY_BASELINE = frozenset({"remax"})
NEEDS_GROUPS = frozenset({"grpo", "rloo", "reinforce_plus_plus_baseline"})


def get_advantage_estimator(name: str) -> AdvantageFn:
    """The estimator registered under `name`; unknown names list the known ones."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; known: {', '.join(ADVANTAGE_ESTIMATORS)}"
        ) from None
