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

    def model_problems(
        self, num_layers: int, num_attention_heads: int, num_query_groups: int, what: str = "model"
    ) -> list[str]:
        """Every reason this layout cannot shard a model of this shape (empty if it can)."""
        problems = []
        for count, label, size, name in (
            (num_attention_heads, "attention heads", self.tp, "TP"),
            (num_query_groups, "query groups (KV heads)", self.tp, "TP"),
            (num_layers, "layers", self.pp, "PP"),
        ):
            if count % size:
                problems.append(
                    f"{what}: {count} {label} are not divisible by {name}={size} "
                    f"({count} % {size} = {count % size})"
                )
        return problems

    def check_model(
        self, num_layers: int, num_attention_heads: int, num_query_groups: int, what: str = "model"
    ) -> None:
        """Raise `LayoutError` listing every reason this layout cannot shard the model."""
        problems = self.model_problems(num_layers, num_attention_heads, num_query_groups, what)
        if problems:
            raise LayoutError("; ".join(problems))

    def describe(self) -> str:
        return (
            f"world {self.world_size} = DP {self.dp} x TP {self.tp} x PP {self.pp} x CP {self.cp}"
            + (f" (EP {self.ep})" if self.ep > 1 else "")
        )
