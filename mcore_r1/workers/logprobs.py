"""Per-token log-probs (and entropy) of given tokens from a Megatron model, at any TP/PP.

The output layer is vocab-parallel: at TP=n each rank holds logits for 1/n of the
(padded) vocabulary. Gathering the full vocabulary would cost `tokens x vocab` floats per
rank, so everything here works on the local shard plus a few all-reduces of per-token
scalars over the TP group:

* log p(target) = -`vocab_parallel_cross_entropy` (Megatron's; max, sum-exp and the target
  logit are all-reduced; its backward is a fused softmax - one-hot).
* entropy = log Z - sum_v p_v x_v, with the two sums all-reduced by
  `reduce_from_tensor_model_parallel_region` (identity backward: every TP rank computes the
  same loss from the reduced sums, so each shard's gradient is just its local part).

The padded vocabulary columns (added so the vocabulary divides by TP; see
`models.mapping.padded_vocab_size`) are not tokens: they are set to -inf on the rank that
holds them, so they get zero probability and zero gradient.

`compute_logprobs` drives the whole batch through `get_forward_backward_func(forward_only)`,
one schedule call with one micro-batch per token-budget bin, so PP pipelines them (with
`variable_seq_lengths`, because packed rows differ in length). Results come back on the last
pipeline stage, per sample, response tokens only, in the original order; other stages get None.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from mcore_r1.workers.batching import MicroBatch, Sample, pack, pad, plan_micro_batches, scatter_back


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Local logit shard with the columns >= `vocab_size` (vocab padding) set to -inf.

    Returns `logits` itself when this rank holds no padding column.
    """
    from megatron.core import parallel_state as mpu

    local = logits.shape[-1]
    start = mpu.get_tensor_model_parallel_rank() * local
    n_real = min(max(vocab_size - start, 0), local)
    if n_real == local:
        return logits
    keep = torch.arange(local, device=logits.device) < n_real
    return logits.masked_fill(~keep, float("-inf"))


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax over the TP-sharded last dimension; -inf columns count as absent."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    logits = logits.float()
    # The max only stabilises exp(); it cancels in the result, so it needs no gradient.
    top = logits.detach().max(dim=-1, keepdim=True).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=mpu.get_tensor_model_parallel_group())
    real = torch.isfinite(logits)
    # where(), not multiply: p * (-inf) would be NaN for the padded columns.
    shifted = torch.where(real, logits - top, torch.zeros_like(logits))
    exp = torch.exp(shifted) * real
    sum_exp = reduce_from_tensor_model_parallel_region(exp.sum(-1))
    expected_x = reduce_from_tensor_model_parallel_region((exp * shifted).sum(-1)) / sum_exp
    return torch.log(sum_exp) - expected_x


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   temperature: float = 1.0, with_entropy: bool = False):
    """log p(labels) `[b, s]` from local logits `[b, s, v/tp]`, and the entropy if asked."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if temperature != 1.0:
        logits = logits / temperature
    logits = mask_vocab_padding(logits, vocab_size)
    entropy = vocab_parallel_entropy(logits) if with_entropy else None
    # Megatron's CE subtracts the max *in place* (float32 input). Nothing else keeps these
    # logits for backward (Megatron's own loss passes them the same way), so a copy is only
    # made for the entropy graph: a full-vocabulary copy is large on GPU.
    ce_input = logits.clone() if with_entropy else logits
    logp = -vocab_parallel_cross_entropy(ce_input.float(), labels)
    return logp, entropy


@torch.no_grad()
def token_entropy(logits: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Entropy `[b, s]` of the sampling distribution, outside the autograd graph (a metric)."""
    logits = logits.detach()
    if temperature != 1.0:
        logits = logits / temperature
    return vocab_parallel_entropy(mask_vocab_padding(logits, vocab_size))


@contextlib.contextmanager
def variable_seq_lengths(model: torch.nn.Module):
    """Let the PP schedule exchange tensor shapes: packed micro-batches differ in length."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    old = config.variable_seq_lengths
    config.variable_seq_lengths = True
    try:
        yield
    finally:
        config.variable_seq_lengths = old


def row_multiple(model: torch.nn.Module) -> int:
    """What a packed row's length must divide by: TP under sequence parallelism, else 1.

    (CP would also need per-sequence padding to 2 x CP in the "thd" format: not supported yet.)
    """
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def make_micro_batches(samples: Sequence[Sample], max_tokens: int, packed: bool = True,
                       fmt: Optional[str] = None, device=None, pad_to_multiple: int = 1,
                       ) -> tuple[list[list[int]], list[MicroBatch]]:
    """The token-budget plan and its micro-batches (packed rows, or padded as the reference).
    Packed rows share each prompt among its responses where `prompt_sharing.applies`."""
    from mcore_r1.parallel import device as devmod
    from mcore_r1.workers import prompt_sharing
    from mcore_r1.workers.batching import packing_format

    if not samples:
        raise ValueError("no samples to form micro-batches from")
    device = device or devmod.get_device()
    fmt = fmt or packing_format()
    if packed and prompt_sharing.applies(samples, fmt):
        return prompt_sharing.make_shared_micro_batches(samples, max_tokens, fmt,
                                                        pad_to_multiple, device)
    plan = plan_micro_batches([s.length for s in samples], max_tokens)
    groups = [[samples[i] for i in group] for group in plan]
    if packed:
        return plan, [pack(g, fmt=fmt, pad_to_multiple=pad_to_multiple, device=device) for g in groups]
    return plan, [pad(g, device=device) for g in groups]


def run_schedule(model: torch.nn.Module, micro_batches: list[MicroBatch],
                 loss_fn: Callable, forward_only: bool, model_inputs: Optional[Callable] = None):
    """One `get_forward_backward_func` call over `micro_batches`.

    `loss_fn(logits, mb, index)` runs on the last stage and returns what the schedule's loss
    function returns (a scalar and a dict). The micro-batch's images (`mb.vision`) go to the
    first stage; `model_inputs(mb)` may add further model kwargs.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    counter = iter(range(len(micro_batches)))
    first_stage = mpu.is_pipeline_first_stage()

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        index = next(counter)
        # Images are embedded on the first stage only; later stages receive hidden states.
        extra = dict(mb.vision) if first_stage else {}
        extra.update(model_inputs(mb) if model_inputs else {})
        with mb.rope_context(model):
            output = model(mb.input_ids, mb.position_ids, mb.attention_mask,
                           **mb.model_kwargs(), **extra)
        return output, lambda logits: loss_fn(logits, mb, index)

    first = micro_batches[0]
    with variable_seq_lengths(model):
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=len(micro_batches), seq_length=first.input_ids.shape[-1],
            micro_batch_size=first.input_ids.shape[0], forward_only=forward_only,
        )


def compute_logprobs(model: torch.nn.Module, samples: Sequence[Sample], vocab_size: int,
                     max_tokens: int, packed: bool = True, temperature: float = 1.0,
                     with_entropy: bool = False, fmt: Optional[str] = None,
                     model_inputs: Optional[Callable] = None):
    """Log-probs of every response token of every sample (no grad).

    Returns, on the last pipeline stage, a list of `[response_len]` tensors in sample order (and
    a second list of entropies when `with_entropy`); None on the other stages.
    """
    from megatron.core import parallel_state as mpu

    plan, micro_batches = make_micro_batches(samples, max_tokens, packed, fmt,
                                             pad_to_multiple=row_multiple(model))
    per_mb_logp: list = [None] * len(micro_batches)
    per_mb_ent: list = [None] * len(micro_batches)

    def loss_fn(logits, mb, index):
        logp, ent = token_logprobs(logits, mb.labels, vocab_size, temperature, with_entropy)
        per_mb_logp[index] = [t.detach().clone() for t in mb.split_response(logp)]
        if with_entropy:
            per_mb_ent[index] = [t.detach().clone() for t in mb.split_response(ent)]
        return torch.zeros((), device=logits.device), {}

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_schedule(model, micro_batches, loss_fn, forward_only=True, model_inputs=model_inputs)
    finally:
        model.train(was_training)
    if not mpu.is_pipeline_last_stage():
        return None
    logps = scatter_back(plan, per_mb_logp, len(samples))
    return (logps, scatter_back(plan, per_mb_ent, len(samples))) if with_entropy else logps
