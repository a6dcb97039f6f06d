"""DAPO extras (2503.14476): dynamic sampling of informative groups and overlong reward shaping.

Dynamic sampling. A group whose responses all scored the same has zero GRPO advantage and
only adds noise (KL/entropy terms) and cost, so DAPO drops it and keeps generating until the
batch holds the target number of prompts. `fill_batch` owns that loop but not the data: the
trainer passes `generate()` (one rollout round, returning its batch, group index and scores)
and `select(batch, rows)`, so this module stays independent of the batch container.
The criterion is the paper's and verl's: keep a group iff its scores are not all equal
(std > 0); EasyR1/OpenRLHF test the group *mean* against an open interval instead, which also
keeps all-equal groups of a format-weighted reward (e.g. all 0.1) - see `keep_informative`.

Overlong shaping (soft overlong punishment). With L_max the generation limit and L_cache the
buffer, a response of length L gets

    R_len = 0                                  if L <= L_max - L_cache
          = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
          = -1                                 if L > L_max          (paper, EasyR1)

times `penalty_factor`, added to the score. verl has no -1 floor, OpenRLHF caps at -factor;
all agree for L <= L_max, which is every response a length-limited engine returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from mcore_r1.algos.common import as_bool_mask, check_finite, check_shapes, clean, group_ids

Tensor = torch.Tensor


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int,
                     penalty_factor: float = 1.0) -> Tensor:
    """penalty_factor * R_len(L) per response (module docstring); 0 when buffer_len is 0."""
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    if buffer_len <= 0:
        return torch.zeros_like(lengths)
    if buffer_len > max_len:
        raise ValueError(f"overlong buffer {buffer_len} is longer than the limit {max_len}")
    expected = max_len - buffer_len
    ramp = (expected - lengths) / buffer_len
    r_len = torch.where(lengths <= expected, torch.zeros_like(ramp),
                        torch.where(lengths <= max_len, ramp, torch.full_like(ramp, -1.0)))
    return penalty_factor * r_len


def apply_overlong_penalty(token_level_scores: Tensor, response_mask: Tensor, max_len: int,
                           buffer_len: int, penalty_factor: float = 1.0) -> tuple[Tensor, Tensor]:
    """Add the overlong penalty on each response's last valid token; return (scores, penalty).

    The length is the number of valid tokens. Rows without valid tokens get no penalty.
    """
    check_shapes(token_level_scores=token_level_scores, response_mask=response_mask)
    m = as_bool_mask(response_mask)
    scores = clean("token_level_scores", token_level_scores, m)
    lengths = m.sum(-1)
    penalty = overlong_penalty(lengths, max_len, buffer_len, penalty_factor).to(scores.dtype)
    last = (lengths - 1).clamp(min=0)
    bonus = torch.zeros_like(scores).scatter(1, last[:, None], penalty[:, None])
    return scores + bonus.masked_fill(~m, 0.0), penalty


def keep_informative(index, scores: Tensor, keep_singletons: bool = True) -> Tensor:
    """Bool (B,): true for responses whose group's scores are not all equal.

    Singleton groups have no spread; verl keeps them (`keep_singletons=True`), EasyR1 and
    OpenRLHF decide by the mean interval. Exact equality is used: any spread is a signal.
    """
    check_finite("scores", scores)
    ids = group_ids(index).to(scores.device)
    n = int(ids.max()) + 1 if ids.numel() else 0
    hi = torch.full((n,), float("-inf"), dtype=scores.dtype).scatter_reduce(0, ids, scores, "amax")
    lo = torch.full((n,), float("inf"), dtype=scores.dtype).scatter_reduce(0, ids, scores, "amin")
    size = torch.zeros(n, dtype=torch.long).index_add_(0, ids, torch.ones_like(ids))
    keep = (hi > lo) | ((size == 1) & keep_singletons)
    return keep[ids]


@dataclass
class DynamicSamplingStats:
    tries: int = 0  # generation rounds run
    generated_groups: int = 0  # groups (prompts) generated over all rounds
    kept_groups: int = 0  # informative groups returned
    dropped_groups: int = 0  # all-equal groups thrown away

    def metrics(self) -> dict:
        total = max(self.generated_groups, 1)
        return {"dynamic_sampling/tries": self.tries,
                "dynamic_sampling/dropped_groups": self.dropped_groups,
                "dynamic_sampling/dropped_frac": self.dropped_groups / total}


def fill_batch(generate: Callable[[], tuple[Any, Any, Tensor]],
               select: Callable[[Any, Tensor], Any], target_groups: int, max_tries: int = 10,
               keep_singletons: bool = True) -> tuple[list, DynamicSamplingStats]:
    """Generate rounds until `target_groups` informative groups are collected.

    `generate()` returns `(batch, index, scores)` for one round (index/scores per response);
    `select(batch, rows)` returns the sub-batch at the given row indices (a LongTensor).
    Returns the selected pieces in order - the last one trimmed so exactly `target_groups`
    groups are kept, whole groups only - and the statistics. `max_tries <= 0` is unlimited
    (verl, EasyR1); running out of tries raises `RuntimeError` with the counts.
    """
    if target_groups < 1:
        raise ValueError(f"target_groups={target_groups} must be >= 1")
    stats, pieces = DynamicSamplingStats(), []
    while stats.kept_groups < target_groups:
        if 0 < max_tries <= stats.tries:
            raise RuntimeError(
                f"dynamic sampling kept {stats.kept_groups} of {target_groups} groups after "
                f"{stats.tries} rounds ({stats.dropped_groups} of {stats.generated_groups} groups "
                "had all-equal rewards); raise algorithm.dynamic_sampling_max_tries or check "
                "that the task is neither too easy nor too hard for the model")
        batch, index, scores = generate()
        stats.tries += 1
        ids = group_ids(index)
        keep = keep_informative(ids, torch.as_tensor(scores), keep_singletons)
        kept_ids = list(dict.fromkeys(ids[keep].tolist()))  # groups in order of appearance
        n_groups = int(ids.max()) + 1 if ids.numel() else 0
        stats.generated_groups += n_groups
        stats.dropped_groups += n_groups - len(kept_ids)
        kept_ids = kept_ids[: target_groups - stats.kept_groups]
        stats.kept_groups += len(kept_ids)
        if kept_ids:
            rows = torch.isin(ids, torch.tensor(kept_ids)).nonzero().flatten()
            pieces.append(select(batch, rows))
    return pieces, stats
