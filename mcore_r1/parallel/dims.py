"""Parallel layout arithmetic, kept free of torch so the config validator can use it.

`ParallelDims` is the single description of how a training world is cut: TP x CP x PP model
replicas of size `model_parallel_size`, and DP copies of that. Every check explains itself with
the numbers that failed, because users meet these errors before anything else.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """An impossible parallel layout; the message shows the arithmetic."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in ("world_size", "tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name} must be a positive integer, got {value!r}")
        if self.world_size % self.model_parallel_size:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by TP x PP x CP = "
                f"{self.tp} x {self.pp} x {self.cp} = {self.model_parallel_size} "
                f"({self.world_size} % {self.model_parallel_size} = "
                f"{self.world_size % self.model_parallel_size})"
            )
        if self.ep > 1 and (self.dp * self.cp) % self.ep:
            raise LayoutError(
                f"expert parallel size {self.ep} must divide DP x CP = {self.dp} x {self.cp} = "
                f"{self.dp * self.cp}"
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.world_size // self.model_parallel_size

    def check_model(
        self, num_layers: int, num_attention_heads: int, num_query_groups: int, what: str = "model"
    ) -> None:
        """Reject a model shape this layout cannot shard."""
        if num_attention_heads % self.tp:
            raise LayoutError(
                f"{what}: {num_attention_heads} attention heads are not divisible by TP={self.tp} "
                f"({num_attention_heads} % {self.tp} = {num_attention_heads % self.tp})"
            )
        if num_query_groups % self.tp:
            raise LayoutError(
                f"{what}: {num_query_groups} query groups (KV heads) are not divisible by "
                f"TP={self.tp} ({num_query_groups} % {self.tp} = {num_query_groups % self.tp})"
            )
        if num_layers % self.pp:
            raise LayoutError(
                f"{what}: {num_layers} layers are not divisible by PP={self.pp} "
                f"({num_layers} % {self.pp} = {num_layers % self.pp})"
            )

    def describe(self) -> str:
        return (
            f"world {self.world_size} = DP {self.dp} x TP {self.tp} x PP {self.pp} x CP {self.cp}"
            + (f" (EP {self.ep})" if self.ep > 1 else "")
        )
