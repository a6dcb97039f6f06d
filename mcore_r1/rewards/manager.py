"""The reward manager: one object the trainer and the evaluator call to score responses.

It picks the scorer from the config (remote endpoint, or a local function run in a
`ScoringPool`), probes a local function once at start-up in this process (so a broken file
fails before workers or GPUs start), adds the optional overlong penalty, and reduces results to
metrics: ``reward/<component>`` means plus the failure counters (``reward/timeouts`` ...).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from mcore_r1.rewards.builtin import overlong_penalty
from mcore_r1.rewards.loader import load_reward_function, probe
from mcore_r1.rewards.pool import ScoringPool
from mcore_r1.rewards.remote import RemoteRewardClient

log = logging.getLogger("mcore_r1.rewards")


class RewardManager:
    def __init__(self, cfg: Any, max_response_length: int = 0):
        self.cfg = cfg
        self.max_length = cfg.max_response_length or max_response_length
        if cfg.overlong_buffer and self.max_length <= cfg.overlong_buffer:
            raise ValueError(f"reward.overlong_buffer={cfg.overlong_buffer} must be smaller than the "
                             f"length limit {self.max_length} (reward.max_response_length, else "
                             "rollout.max_new_tokens)")
        if cfg.remote_url:
            self.scorer = RemoteRewardClient(cfg.remote_url, cfg.remote_timeout_s, cfg.remote_retries,
                                             cfg.remote_batch_size, cfg.fallback_score)
        else:
            rf = load_reward_function(cfg.function)
            parts = probe(rf, dict(cfg.kwargs))
            log.info("reward %s probed: components %s", cfg.function, ", ".join(sorted(parts)))
            self.scorer = ScoringPool(cfg.function, dict(cfg.kwargs), cfg.num_workers, cfg.timeout_s,
                                      cfg.fallback_score, batched=rf.batched)

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.scorer.counters)

    def restore_counters(self, counters: dict[str, int]) -> None:
        """Continue the failure counters of a resumed run (they are cumulative)."""
        self.scorer.counters.clear()
        self.scorer.counters.update({k: int(v) for k, v in counters.items()})

    def score(self, samples: list[dict]) -> list[dict[str, float]]:
        """Samples hold response, ground_truth, prompt, response_length; returns component dicts."""
        results = self.scorer.score(samples)
        if self.cfg.overlong_buffer:
            for sample, result in zip(samples, results):
                penalty = overlong_penalty(int(sample["response_length"]), self.max_length,
                                           self.cfg.overlong_buffer)
                result["overlong"] = penalty
                result["overall"] += self.cfg.overlong_penalty_factor * penalty
        return results

    def metrics(self, results: list[dict[str, float]], prefix: str = "reward/") -> dict[str, float]:
        """Mean of each component over the samples that have it, plus the failure counters."""
        sums: dict[str, list[float]] = {}
        for result in results:
            for key, value in result.items():
                sums.setdefault(key, []).append(value)
        out = {f"{prefix}{k}": sum(v) / len(v) for k, v in sorted(sums.items())}
        out.update({f"{prefix}{k}": float(v) for k, v in sorted(self.counters.items())})
        return out

    def close(self) -> None:
        closer: Optional[Any] = getattr(self.scorer, "close", None)
        if closer:
            closer()

    def __enter__(self) -> "RewardManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
