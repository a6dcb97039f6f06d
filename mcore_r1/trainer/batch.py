"""The driver's view of one step's responses, and how they are cut for the workers.

`RolloutBatch` keeps one entry per response (its prompt, group id, token ids, the rollout
engine's log-probs, text, finish reason) and turns per-response lists into the right-padded
`B x T` matrices that `mcore_r1.algos` works on.

Batch-size semantics, stated once (see also `config.schema`): a step has
`data.prompts_per_step x rollout.n` responses; they are shuffled (seeded by step) and cut into
mini-batches of `trainer.mini_batch_size` responses, one optimizer update each; every
mini-batch is split evenly over the DP ranks; each rank cuts its share into micro-batches by
the token budget `trainer.micro_batch_tokens`. `BatchPlan` holds that arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mcore_r1.workers.sequences import Sequence as WorkerSequence


@dataclass
class RolloutBatch:
    items: list = field(default_factory=list)        # PromptItem per response
    group: list[int] = field(default_factory=list)   # group id per response (one per prompt)
    prompt_keys: list[int] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    rollout_logp: list[list[float]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    rewards: list[dict] = field(default_factory=list)  # filled by scoring

    def __len__(self) -> int:
        return len(self.response_ids)

    def select(self, rows: Sequence[int]) -> "RolloutBatch":
        rows = [int(r) for r in rows]
        return RolloutBatch(**{name: [getattr(self, name)[r] for r in rows] if getattr(self, name) else []
                               for name in self.__dataclass_fields__})

    @staticmethod
    def concat(pieces: Sequence["RolloutBatch"]) -> "RolloutBatch":
        out = RolloutBatch()
        for piece in pieces:
            for name in out.__dataclass_fields__:
                getattr(out, name).extend(getattr(piece, name))
        return out

    @property
    def width(self) -> int:
        return max(len(r) for r in self.response_ids)

    def matrix(self, rows: Sequence[Sequence[float]], dtype=torch.float32) -> torch.Tensor:
        """Per-response lists -> `B x T` right-padded with 0."""
        out = torch.zeros(len(rows), self.width, dtype=dtype)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.as_tensor(list(r), dtype=dtype)
        return out

    def response_mask(self) -> torch.Tensor:
        return self.matrix([[1.0] * len(r) for r in self.response_ids]).bool()

    def scores(self) -> torch.Tensor:
        return torch.tensor([r["overall"] for r in self.rewards], dtype=torch.float32)

    def token_level_scores(self) -> torch.Tensor:
        """The outcome score on each response's last token (the algos' convention)."""
        return self.matrix([[0.0] * (len(ids) - 1) + [r["overall"]]
                            for ids, r in zip(self.response_ids, self.rewards)])

    def sequences(self, rows: Sequence[int]) -> list[WorkerSequence]:
        return [WorkerSequence(list(self.items[i].prompt_token_ids), list(self.response_ids[i]),
                               list(self.items[i].images), self.prompt_keys[i]) for i in rows]

    def reward_samples(self) -> list[dict]:
        return [{"prompt": item.prompt, "response": text, "ground_truth": item.answer,
                 "response_length": len(ids)}
                for item, text, ids in zip(self.items, self.texts, self.response_ids)]


@dataclass(frozen=True)
class BatchPlan:
    """Which responses each DP rank holds and which of its rows form each mini-batch."""

    order: list[int]        # shuffled response indices; mini-batch m = order[m*M:(m+1)*M]
    mini_batch_size: int
    dp: int

    @classmethod
    def make(cls, size: int, mini_batch_size: int, dp: int, seed: int) -> "BatchPlan":
        if size % mini_batch_size or mini_batch_size % dp:
            raise ValueError(f"{size} responses cannot be cut into mini-batches of {mini_batch_size} "
                             f"split over {dp} DP ranks")
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        return cls(order, mini_batch_size, dp)

    @property
    def num_mini_batches(self) -> int:
        return len(self.order) // self.mini_batch_size

    @property
    def per_rank(self) -> int:
        return self.mini_batch_size // self.dp

    def rank_rows(self, dp_rank: int) -> list[int]:
        """Global response indices held by `dp_rank`, mini-batch by mini-batch."""
        out: list[int] = []
        for m in range(self.num_mini_batches):
            start = m * self.mini_batch_size + dp_rank * self.per_rank
            out.extend(self.order[start:start + self.per_rank])
        return out

    def local_rows(self, m: int) -> list[int]:
        """Rows of mini-batch `m` in every rank's local numbering."""
        return list(range(m * self.per_rank, (m + 1) * self.per_rank))


def gather_by_dp(results: Sequence[Any], plan: BatchPlan, size: int, key: str) -> list:
    """Per-DP-rank lists (reported once per DP rank) -> one list in global response order."""
    out: list = [None] * size
    for r in results:
        if r is None or r.get(key) is None:
            continue
        for g, value in zip(plan.rank_rows(r["dp_rank"]), r[key]):
            out[g] = value
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise RuntimeError(f"no {key} for responses {missing[:8]}: a DP rank did not report")
    return out
