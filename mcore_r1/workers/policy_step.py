"""One policy-gradient accumulation pass: forward, per-token log-probs, loss, backward.

`policy_loss_step` takes a mini-batch (samples plus the rollout's right-padded `B x T`
response matrices: old log-probs, advantages, loss mask, optionally reference log-probs and
truncated importance weights),
cuts it into token-budget micro-batches, and runs them through Megatron's schedule with
`forward_only=False`, so gradients accumulate in the parameters (`.grad`, or `main_grad`
under Megatron DDP) at any TP/PP. The optimizer step is the caller's.

Why the result does not depend on how the batch was cut (packed or padded, any budget):

* every micro-batch loss is `aggregate_loss(..., normaliser=global)` where the normaliser
  counts the tokens / sequences of the *whole* mini-batch (summed over DP ranks); summing
  micro-batch losses then gives the whole-batch loss (see `algos.aggregation`);
* Megatron's schedule divides each micro-batch loss by the number of micro-batches (and
  multiplies by the CP size) before backward, to average; we pre-multiply by the inverse so
  the backward sees exactly our share of the global sum;
* `grad_scale` multiplies the backward loss on top: pass the DP size when the DP gradient
  reduction averages (Megatron DDP's default), so that the averaged gradient is the sum.

Per micro-batch the response rows are re-padded to that micro-batch's longest response: all
aggregation modes ignore padding width (`seq-mean-token-sum-norm` uses a fixed `norm_len`).

On-policy updates (`old_log_probs=None`): when a rollout batch gets exactly one optimizer step,
the old policy *is* the current one, so its log-probs are this forward's, detached. The
separate old-policy pass would compute the same numbers (same weights, same micro-batches);
skipping it saves a forward pass over the batch. The step then returns those log-probs and
the entropies (`StepResult.log_probs`, `.entropy`) for the metrics the old pass fed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from mcore_r1.algos import (
    LossNormaliser, actor_loss_matrix, aggregate_loss, get_policy_loss, kl_penalty,
)
from mcore_r1.workers.batching import MicroBatch, Sample
from mcore_r1.workers.logprobs import (
    make_micro_batches, row_multiple, run_schedule, token_entropy, token_logprobs,
)


@dataclass
class LossConfig:
    """How the per-token actor loss is formed and reduced (mirrors `AlgorithmConfig` fields)."""

    policy_loss: str = "ppo_clip"
    loss_kwargs: dict = field(default_factory=dict)  # e.g. algos.policy_loss_kwargs(algo)
    agg_mode: str = "token-mean"
    norm_len: Optional[float] = None  # seq-mean-token-sum-norm only
    entropy_coeff: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    temperature: float = 1.0


@dataclass
class StepResult:
    """Summed loss over the mini-batch and token-weighted metrics (last pipeline stage)."""

    loss: float
    metrics: dict
    num_micro_batches: int
    log_probs: Optional[list] = None  # on-policy only: [response_len] tensors, sample order
    entropy: Optional[list] = None


def take_rows(matrix: Optional[torch.Tensor], indices: Sequence[int], lengths: Sequence[int],
              width: int, device=None) -> Optional[torch.Tensor]:
    """Rows `indices` of a right-padded `B x T` matrix, cut/zero-padded to `width` columns."""
    if matrix is None:
        return None
    out = torch.zeros(len(indices), width, dtype=matrix.dtype, device=device or matrix.device)
    for r, (i, n) in enumerate(zip(indices, lengths)):
        out[r, :n] = matrix[i, :n]
    return out


def stack_rows(values: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Right-pad differentiable 1-D tensors into `[len, width]` (padding 0, never read)."""
    return torch.stack([torch.nn.functional.pad(v, (0, width - v.numel())) for v in values])


def check_inputs(samples: Sequence[Sample], **matrices) -> None:
    for name, m in matrices.items():
        if m is None:
            continue
        if m.dim() != 2 or m.shape[0] != len(samples):
            raise ValueError(f"{name} must be [B={len(samples)}, T], got {tuple(m.shape)}")
        longest = max(s.response_len for s in samples)
        if m.shape[1] < longest:
            raise ValueError(f"{name} has {m.shape[1]} columns but the longest response has {longest} tokens")


def policy_loss_step(model: torch.nn.Module, samples: Sequence[Sample], vocab_size: int,
                     max_tokens: int, *, old_log_probs: Optional[torch.Tensor],
                     advantages: torch.Tensor,
                     response_mask: torch.Tensor, ref_log_probs: Optional[torch.Tensor] = None,
                     is_weights: Optional[torch.Tensor] = None, cfg: Optional[LossConfig] = None,
                     packed: bool = True, normaliser: Optional[LossNormaliser] = None, dp_group=None,
                     grad_scale: float = 1.0, fmt: Optional[str] = None,
                     model_inputs: Optional[Callable] = None) -> Optional[StepResult]:
    """Accumulate the gradients of the mini-batch's actor loss; see the module docstring.

    `old_log_probs=None` means on-policy: the old log-probs are this forward's (see the module
    docstring). `normaliser` defaults to `LossNormaliser.of(response_mask)` summed over `dp_group`
    (default: Megatron's data-parallel group); pass it explicitly when a mini-batch is split
    over several calls. Returns None on stages other than the last pipeline stage.
    """
    from megatron.core import parallel_state as mpu

    cfg = cfg or LossConfig()
    check_inputs(samples, old_log_probs=old_log_probs, advantages=advantages,
                 response_mask=response_mask, ref_log_probs=ref_log_probs, is_weights=is_weights)
    if cfg.kl_coef and ref_log_probs is None:
        raise ValueError("kl_coef > 0 needs ref_log_probs")
    if normaliser is None:
        # Count only columns inside each response: the matrix may be wider than a row's response.
        normaliser = LossNormaliser.of(take_rows(response_mask, range(len(samples)),
                                             [s.response_len for s in samples],
                                             response_mask.shape[1]))
        # Megatron's DP group by default: TP/PP ranks of one replica see the same samples.
        normaliser = normaliser.all_reduce(dp_group or mpu.get_data_parallel_group())
    plan, micro_batches = make_micro_batches(samples, max_tokens, packed, fmt,
                                             pad_to_multiple=row_multiple(model))
    kept: Optional[dict] = {} if old_log_probs is None else None
    loss_fn = _micro_batch_loss(plan, samples, vocab_size, cfg, normaliser, grad_scale,
                                dict(old=old_log_probs, adv=advantages, mask=response_mask,
                                     ref=ref_log_probs, w=is_weights), len(micro_batches), kept)
    model.train()
    reports = run_schedule(model, micro_batches, loss_fn, forward_only=False, model_inputs=model_inputs)
    if not mpu.is_pipeline_last_stage():
        return None
    result = summarise(reports, len(micro_batches))
    if kept is not None:
        result.log_probs = [kept[i][0] for i in range(len(samples))]
        result.entropy = [kept[i][1] for i in range(len(samples))]
    return result


def _micro_batch_loss(plan, samples, vocab_size, cfg: LossConfig, normaliser, grad_scale,
                      inputs: dict, num_micro_batches: int, kept: Optional[dict] = None):
    """The schedule's loss function. With `kept` (on-policy) the old log-probs are the
    forward's own, detached, and each sample's log-probs and entropies are stored in it."""
    from megatron.core import parallel_state as mpu

    policy_fn = get_policy_loss(cfg.policy_loss)
    # The schedule multiplies by the CP size and divides by the micro-batch count; undo both.
    schedule_undo = num_micro_batches / mpu.get_context_parallel_world_size()

    def loss_fn(logits: torch.Tensor, mb: MicroBatch, index: int):
        indices = plan[index]
        lengths = [samples[i].response_len for i in indices]
        width = max(lengths)
        need_entropy = bool(cfg.entropy_coeff)
        # the metric's entropy, before the cross entropy below shifts the logits in place
        metric_ent = (token_entropy(logits, vocab_size, cfg.temperature)
                      if kept is not None and not need_entropy else None)
        logp_tok, ent_tok = token_logprobs(logits, mb.labels, vocab_size, cfg.temperature, need_entropy)
        if metric_ent is None:
            metric_ent = ent_tok
        logp = stack_rows(mb.split_response(logp_tok), width)
        rows = {k: take_rows(v, indices, lengths, width, logits.device) for k, v in inputs.items()}
        mask = rows["mask"].bool()
        poisoned = False
        if kept is not None:
            for i, lp, ent in zip(indices, mb.split_response(logp_tok), mb.split_response(metric_ent)):
                kept[i] = (lp.detach().clone(), ent.detach().clone())
            # Non-finite model outputs (no separate pass checked them first): the loss becomes
            # NaN, so the optimizer step applies `trainer.nonfinite` like for any NaN loss.
            poisoned = not bool(torch.isfinite(logp.detach()[mask]).all())
            if poisoned:
                logp = torch.nan_to_num(logp, nan=0.0, posinf=0.0, neginf=0.0)
        old = logp.detach() if kept is not None else rows["old"]
        out = policy_fn(logp, old, rows["adv"], mask, **cfg.loss_kwargs)
        entropy = stack_rows(mb.split_response(ent_tok), width) if cfg.entropy_coeff else None
        kl = kl_penalty(logp, rows["ref"], cfg.kl_estimator, mask) if cfg.kl_coef else None
        mat = actor_loss_matrix(out.loss_mat, mask, is_weights=rows["w"], entropy=entropy,
                                entropy_coeff=cfg.entropy_coeff, kl=kl, kl_coef=cfg.kl_coef)
        loss = aggregate_loss(mat, mask, cfg.agg_mode, normaliser=normaliser, norm_len=cfg.norm_len)
        if poisoned:
            loss = loss * float("nan")
        report = {"loss": loss.detach().clone(), "tokens": float(mask.sum())}
        report.update({k: float(v) for k, v in out.metrics.items()})
        if kl is not None:
            report["kl"] = float(kl.detach().masked_fill(~mask, 0.0).sum() / mask.sum().clamp(min=1))
        return loss * (schedule_undo * grad_scale), report

    return loss_fn


def summarise(reports: list[dict], n: int) -> StepResult:
    """Sum the losses; token-weight the per-micro-batch metric means."""
    total = float(sum(r["loss"] for r in reports))
    tokens = sum(r["tokens"] for r in reports)
    keys = [k for k in reports[0] if k not in ("loss", "tokens")] if reports else []
    metrics = {k: sum(r[k] * r["tokens"] for r in reports) / max(tokens, 1.0) for k in keys}
    return StepResult(loss=total, metrics=metrics, num_micro_batches=n)
