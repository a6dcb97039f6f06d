"""A seeded, resumable prompt sampler: its position is part of a training checkpoint.

Each epoch is a permutation of ``range(size)`` drawn from ``random.Random(f"{seed}:{epoch}")``,
so the order depends only on (seed, epoch): no hidden RNG state needs saving, and the state is
three integers (epoch, position in the epoch, and the dataset size as a guard). Batches run
across epoch boundaries, so every prompt is seen once per epoch and no tail is dropped.
Restoring the state resumes with exactly the batch that would have come next.
"""

from __future__ import annotations

import random


class ResumableSampler:
    def __init__(self, size: int, seed: int = 1, shuffle: bool = True):
        if size < 1:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, batch_size: int) -> list[int]:
        """The next `batch_size` dataset indices, continuing into the next epoch as needed."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch: list[int] = []
        while len(batch) < batch_size:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(batch_size - len(batch), self.size - self.position)
            batch.extend(self._order[self.position:self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": self.size,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]!r} but this run "
                                 f"has {key}={getattr(self, key)!r}: the dataset or seed changed")
        if not 0 <= state["position"] <= self.size:
            raise ValueError(f"sampler position {state['position']} outside [0, {self.size}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
