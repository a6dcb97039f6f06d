"""Loss aggregation: a `B x T` per-token loss matrix -> one scalar, invariant to batch splits.

A mini-batch is usually processed as several micro-batches on several data-parallel ranks,
each contributing a loss whose gradients are summed (gradient accumulation + DP all-reduce).
Averaging per-micro-batch means would weight tokens of short micro-batches more than others;
so every mode here divides by a *global* normaliser that the trainer passes in:

    normaliser = LossNormaliser.of(mask_mb1) + LossNormaliser.of(mask_mb2) + ...   (this rank)
    normaliser = normaliser.all_reduce(dp_group)                                   (all ranks)
    loss_mb    = aggregate_loss(loss_mat_mb, mask_mb, mode, normaliser=normaliser)

Then sum over micro-batches and ranks of `loss_mb` == `aggregate_loss(whole batch)` and so do
the gradients, provided the DP all-reduce *sums* gradients. When the DP reduction averages
(Megatron's default scales gradients by 1/dp), multiply each micro-batch loss by the DP size.
Without a normaliser, the formulas apply to the tensor given (single-process, whole batch).

Modes (L = loss matrix, M = mask, n_i = sum_t M_it, S = #sequences with n_i > 0):

    token-mean               sum_it L M / sum_it M
    seq-mean-token-mean      (1/S) sum_i [sum_t L M / n_i]
    seq-mean-token-sum       (1/S) sum_i  sum_t L M
    seq-mean-token-sum-norm  (1/S) sum_i  sum_t L M / norm_len     (Dr.GRPO)

Fully masked rows count neither as tokens nor as sequences (verl; EasyR1 counts them in S).
`seq-mean-token-sum-norm` follows the Dr.GRPO paper and its oat code (and TRL `dr_grpo`):
divide by a constant length (the generation budget) *and* by the number of sequences; verl's
mode of the same name omits 1/S and is S times larger (same direction, different scale).
The constant must be fixed (e.g. `rollout.max_new_tokens`), not the padded width of a
micro-batch, or the loss would depend on how the batch was split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mcore_r1.algos.common import as_bool_mask, check_finite, check_shapes

Tensor = torch.Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LossNormaliser:
    """Global counts a micro-batch loss is divided by: valid tokens and non-empty sequences."""

    tokens: float
    seqs: float

    @staticmethod
    def of(mask: Tensor) -> "LossNormaliser":
        """The counts of one (micro-)batch's `response_mask`."""
        m = as_bool_mask(mask)
        return LossNormaliser(float(m.sum()), float((m.sum(-1) > 0).sum()))

    def __add__(self, other: "LossNormaliser") -> "LossNormaliser":
        return LossNormaliser(self.tokens + other.tokens, self.seqs + other.seqs)

    def all_reduce(self, group=None) -> "LossNormaliser":
        """Sum the counts over the ranks of `group` (the data-parallel group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        counts = torch.tensor([self.tokens, self.seqs], dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        return LossNormaliser(float(counts[0]), float(counts[1]))


def check_agg_mode(mode: str) -> str:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {', '.join(AGG_MODES)}")
    return mode


def aggregate_loss(loss_mat: Tensor, response_mask: Tensor, mode: str = "token-mean", *,
                   normaliser: Optional[LossNormaliser] = None,
                   norm_len: Optional[float] = None) -> Tensor:
    """This (micro-)batch's share of the aggregated loss; see the module docstring for the modes.

    `normaliser` holds the global counts (default: the counts of `response_mask` itself).
    `norm_len` is the constant length of `seq-mean-token-sum-norm` (required by that mode).
    An empty global selection gives an exact 0 that keeps the graph (no NaN).
    """
    check_agg_mode(mode)
    check_shapes(loss_mat=loss_mat, response_mask=response_mask)
    m = as_bool_mask(response_mask)
    check_finite("loss_mat", loss_mat, m)
    norm = normaliser or LossNormaliser.of(m)
    # Select, do not multiply: NaN junk at padded slots must stay out of values and grads.
    row_sums = loss_mat.masked_fill(~m, 0.0).sum(-1)
    if mode == "token-mean":
        return row_sums.sum() / max(norm.tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = row_sums / m.sum(-1).clamp(min=1)
        return per_seq.sum() / max(norm.seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return row_sums.sum() / max(norm.seqs, 1.0)
    if norm_len is None or norm_len <= 0:
        raise ValueError("seq-mean-token-sum-norm needs norm_len > 0 (e.g. rollout.max_new_tokens)")
    return row_sums.sum() / (max(norm.seqs, 1.0) * float(norm_len))
