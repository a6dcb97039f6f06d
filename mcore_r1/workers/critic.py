"""The critic for PPO/GAE: the policy's Megatron model with a scalar value head.

The critic starts from the actor's checkpoint (same layout, same TP/PP sharding) and replaces
the LM head by `ValueHead`, a `hidden -> 1` linear layer initialised to zero, so the first
values are exactly 0 and the first GAE advantages are the plain returns. The head is
replicated over TP: its input (the final hidden states) is identical on every TP rank, so its
gradients are too, and it needs no collective. The head is untied from the embedding, which
also keeps Megatron from all-reducing it with the embedding across pipeline stages.

`V_t` for response token t is read where the policy's log-prob of token t is read: at the
position before it (the state the token was chosen in), through `MicroBatch.split_response`.
`value_loss_step` mirrors `policy_step.policy_loss_step`: global normaliser, schedule undo,
`grad_scale` for DP averaging, so the critic loss is also independent of how the batch is cut.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mcore_r1.algos import LossNormaliser, aggregate_loss, value_loss
from mcore_r1.workers.batching import Sample
from mcore_r1.workers.logprobs import make_micro_batches, row_multiple, run_schedule
from mcore_r1.workers.policy_step import StepResult, stack_rows, summarise, take_rows


class ValueHead(torch.nn.Module):
    """Drop-in for Megatron's output layer: `(hidden [s, b, h]) -> (values [s, b, 1], None)`."""

    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias), None


def attach_value_head(model: torch.nn.Module) -> torch.nn.Module:
    """Turn this rank's (actor-initialised) stage into a critic stage, in place."""
    lm = getattr(model, "language_model", model)
    lm.share_embeddings_and_output_weights = False
    if getattr(lm, "post_process", False):
        dtype = next(lm.parameters()).dtype
        lm.output_layer = ValueHead(lm.config.hidden_size, dtype).to(next(lm.parameters()).device)
    return model


def _values(output: torch.Tensor) -> torch.Tensor:
    return output[..., 0].float()  # [rows, T, 1] -> [rows, T]


def compute_values(model: torch.nn.Module, samples: Sequence[Sample], max_tokens: int
                   ) -> Optional[list[torch.Tensor]]:
    """`[response_len]` values per sample (last pipeline stage; None elsewhere)."""
    from megatron.core import parallel_state as mpu

    from mcore_r1.workers.batching import scatter_back

    plan, micro_batches = make_micro_batches(samples, max_tokens, pad_to_multiple=row_multiple(model))
    per_mb: list = [None] * len(micro_batches)

    def loss_fn(output, mb, index):
        per_mb[index] = [v.detach().clone() for v in mb.split_response(_values(output))]
        return torch.zeros((), device=output.device), {}

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_schedule(model, micro_batches, loss_fn, forward_only=True)
    finally:
        model.train(was_training)
    if not mpu.is_pipeline_last_stage():
        return None
    return scatter_back(plan, per_mb, len(samples))


def value_loss_step(model: torch.nn.Module, samples: Sequence[Sample], max_tokens: int, *,
                    returns: torch.Tensor, old_values: torch.Tensor, response_mask: torch.Tensor,
                    clip: Optional[float], agg_mode: str = "token-mean", norm_len: Optional[float] = None,
                    grad_scale: float = 1.0, dp_group=None) -> Optional[StepResult]:
    """Accumulate the critic loss's gradients over token-budget micro-batches."""
    from megatron.core import parallel_state as mpu

    lengths_all = [s.response_len for s in samples]
    normaliser = LossNormaliser.of(take_rows(response_mask, range(len(samples)), lengths_all,
                                             response_mask.shape[1]))
    normaliser = normaliser.all_reduce(dp_group or mpu.get_data_parallel_group())
    plan, micro_batches = make_micro_batches(samples, max_tokens, pad_to_multiple=row_multiple(model))
    schedule_undo = len(micro_batches) / mpu.get_context_parallel_world_size()
    inputs = dict(ret=returns, old=old_values, mask=response_mask)

    def loss_fn(output, mb, index):
        indices = plan[index]
        lengths = [samples[i].response_len for i in indices]
        width = max(lengths)
        values = stack_rows(mb.split_response(_values(output)), width)
        rows = {k: take_rows(v, indices, lengths, width, output.device) for k, v in inputs.items()}
        mask = rows["mask"].bool()
        out = value_loss(values, rows["old"], rows["ret"], mask, clip=clip)
        loss = aggregate_loss(out.loss_mat, mask, agg_mode, normaliser=normaliser, norm_len=norm_len)
        report = {"loss": loss.detach().clone(), "tokens": float(mask.sum())}
        report.update({k: float(v) for k, v in out.metrics.items()})
        return loss * (schedule_undo * grad_scale), report

    model.train()
    reports = run_schedule(model, micro_batches, loss_fn, forward_only=False)
    if not mpu.is_pipeline_last_stage():
        return None
    return summarise(reports, len(micro_batches))
