"""Rollout on the driver's side: split prompts over vLLM replicas, collect, check, score.

Each rollout replica (`rollout.tp` consecutive ranks) gets a contiguous share of the prompts;
every rank of a replica receives the same share (vLLM's external launcher needs it) and the
replica's first rank returns the generations. The prompt ids vLLM produced are compared with
the data loader's: a mismatch means training would score tokens the engine never saw.

Scoring runs in the driver's reward pool. A reward function that raises is not silently
zeroed here: `RewardManager` reports the traceback with the failing sample and, by default,
gives the fallback score (counted in `reward/errors`); see `mcore_r1.rewards`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import torch

from mcore_r1.rollout.colocated import SamplingOptions
from mcore_r1.trainer.batch import RolloutBatch


def replica_shares(items: Sequence[Any], num_replicas: int) -> list[list]:
    """Contiguous, balanced slices of `items`, one per replica (as `ColocatedEngine.my_share`)."""
    per, extra = divmod(len(items), num_replicas)
    shares, start = [], 0
    for r in range(num_replicas):
        size = per + (r < extra)
        shares.append(list(items[start:start + size]))
        start += size
    return shares


def vllm_request(item) -> dict:
    if item.images:
        return {"prompt": item.prompt, "multi_modal_data": {"image": list(item.images)}}
    return {"prompt": item.prompt}


def prompt_seed(base: int, step: int, call: int, index: int) -> int:
    """The sampling seed of prompt `index` in the `call`-th generation of `step`: a pure
    function of those numbers, so a resumed run draws exactly what an uninterrupted one did."""
    import hashlib

    digest = hashlib.blake2b(f"{base}:{step}:{call}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class Rollout:
    def __init__(self, workers, infos, rewards, cfg):
        self.workers, self.infos, self.rewards, self.cfg = workers, infos, rewards, cfg
        self.num_replicas = infos[0].num_replicas
        self.next_group = 0
        self.step, self.calls = 0, 0
        self.timer = None  # the caller's PhaseTimer: generation and scoring become sub-phases

    def begin_step(self, step: int, timer=None) -> None:
        """Seeds of the generations that follow derive from `step` and their order in it."""
        self.step, self.calls = step, 0
        self.timer = timer

    def _phase(self, name: str):
        """`name` timed as a sub-phase of the timer's innermost active phase (rollout/generate)."""
        t = self.timer
        if t is None:
            return contextlib.nullcontext()
        return t(f"{t.active[-1]}/{name}" if t.active else name)

    def options(self, validation: bool = False, greedy: bool = False) -> SamplingOptions:
        r = self.cfg.rollout
        if greedy or validation:
            temperature = 0.0 if greedy else r.val_temperature
            return SamplingOptions(n=1 if greedy else r.val_n, temperature=temperature, top_p=r.top_p,
                                   top_k=r.top_k, max_tokens=r.max_new_tokens)
        return SamplingOptions(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                               max_tokens=r.max_new_tokens, ignore_eos=r.ignore_eos)

    def generate(self, items: Sequence[Any], keys: Sequence[int], options: SamplingOptions) -> RolloutBatch:
        """Responses to `items` (dataset rows `keys`), `options.n` each, in prompt order."""
        shares = replica_shares(list(range(len(items))), self.num_replicas)
        seeds = [prompt_seed(self.cfg.rollout.seed, self.step, self.calls, i) for i in range(len(items))]
        self.calls += 1
        calls = [([vllm_request(items[i]) for i in shares[info.replica]], options,
                  [seeds[i] for i in shares[info.replica]]) for info in self.infos]
        leaders = self.workers.call_each("generate", calls)
        by_replica = {info.replica: out for info, out in zip(self.infos, leaders) if out is not None}
        batch = RolloutBatch()
        for replica in range(self.num_replicas):
            for i, result in zip(shares[replica], by_replica[replica]):
                item = items[i]
                if list(result.prompt_token_ids) != list(item.prompt_token_ids):
                    raise RuntimeError(
                        f"{item.where}: vLLM tokenised the prompt into {len(result.prompt_token_ids)} "
                        f"ids, the data loader into {len(item.prompt_token_ids)}: image size limits or "
                        "chat templates differ between training and rollout")
                group = self.next_group
                self.next_group += 1
                for sample in result.samples:
                    ids = list(sample.token_ids)
                    if not ids:  # vLLM always emits >= 1 token (EOS at least); guard the matrices
                        raise RuntimeError(f"{item.where}: vLLM returned an empty response")
                    batch.items.append(item)
                    batch.group.append(group)
                    batch.prompt_keys.append(int(keys[i]))
                    batch.response_ids.append(ids)
                    batch.rollout_logp.append(list(sample.logprobs))
                    batch.texts.append(sample.text)
                    batch.finish.append(sample.finish_reason or "")
        return batch

    def generate_scored(self, items: Sequence[Any], keys: Sequence[int],
                        options: Optional[SamplingOptions] = None) -> RolloutBatch:
        with self._phase("generate"):
            batch = self.generate(items, keys, options or self.options())
        with self._phase("reward"):
            batch.rewards = self.rewards.score(batch.reward_samples())
        return batch

    def greedy_baselines(self, batch: RolloutBatch) -> torch.Tensor:
        """ReMax: the score of one greedy response per prompt, repeated for its samples."""
        firsts = list(dict.fromkeys(batch.group))
        rows = [batch.group.index(g) for g in firsts]
        greedy = self.generate_scored([batch.items[r] for r in rows], [batch.prompt_keys[r] for r in rows],
                                      self.options(greedy=True))
        by_group = {g: s for g, s in zip(firsts, greedy.scores().tolist())}
        return torch.tensor([by_group[g] for g in batch.group], dtype=torch.float32)

    def fill(self, draw: Callable[[], tuple[list, list[int]]]) -> tuple[RolloutBatch, dict]:
        """One step's batch: plain, or DAPO dynamic sampling (informative groups only)."""
        from mcore_r1.algos import fill_batch

        a = self.cfg.algorithm
        if not a.dynamic_sampling:
            return self.generate_scored(*draw()), {}

        def one_round():
            batch = self.generate_scored(*draw())
            return batch, batch.group, batch.scores()

        pieces, stats = fill_batch(one_round, lambda b, rows: b.select(rows.tolist()),
                                   self.cfg.data.prompts_per_step, a.dynamic_sampling_max_tries)
        return RolloutBatch.concat(pieces), stats.metrics()
