"""Megatron's optimizer on CPU (DDP wrapper, gradient clipping by total norm, Adam) at TP=2
takes the same step as torch.optim.AdamW with clip_grad_norm_ on the unsharded model."""

import torch

from tests.dist_utils import run_workers
from tests.parallel import gpt_harness as h

LR, CLIP = 1e-2, 0.05
# Adam's first step is lr * g / (|g| + eps): with eps far below |g| it is lr * sign(g), which
# turns rounding noise in near-zero grads into full-size differences. A larger eps keeps the
# comparison about the optimizer's arithmetic, not about signs of noise.
EPS = 1e-4


def _reference_step(ref: dict) -> dict:
    """Independent reference: plain tensors, torch's own clipping and AdamW."""
    params = {n: torch.nn.Parameter(ref["state"][n].clone()) for n in ref["grads"]}
    for name, p in params.items():
        p.grad = ref["grads"][name].clone()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
    opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=(0.9, 0.999), eps=EPS,
                            weight_decay=0.0)
    opt.step()
    return {"norm": norm.item(), "params": {n: p.detach() for n, p in params.items()}}


def _megatron_step(rank, world_size, ref, expected):
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel

    initialize_parallel(ParallelDims(world_size, tp=2))
    tp_rank = mpu.get_tensor_model_parallel_rank()
    model = h.build_gpt(h.gpt_config(2, 1), tied=True)
    params = dict(model.named_parameters())
    model.load_state_dict({n: h.shard_full_tensor(n, ref["state"][n], params.get(n, t), tp_rank, 2)
                           for n, t in model.state_dict().items()
                           if "_extra_state" not in n and t is not None}, strict=False)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=CLIP, adam_eps=EPS,
                        bf16=False, params_dtype=torch.float32), [ddp])
    ddp.zero_grad_buffer()
    opt.zero_grad()
    tokens, labels = h.make_batch()
    pos = torch.arange(h.SEQ).unsqueeze(0).expand(h.MICRO_BATCHES, -1)
    logits = ddp(tokens, pos, h.causal_mask())
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    vocab_parallel_cross_entropy(logits.contiguous(), labels).mean().backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = opt.step()
    diffs = {}
    for name, p in model.named_parameters():
        want = h.shard_full_tensor(name, expected["params"][name], p, tp_rank, 2)
        diffs[name] = (p.detach() - want).abs().max().item()
    return ok, grad_norm, diffs


def _reference(rank, world_size):
    return h.reference(tied=True)


def test_clipped_adam_step_matches_torch():
    ref = run_workers(_reference, 1)[0]
    expected = _reference_step(ref)
    assert expected["norm"] > CLIP  # the clip really scales this step
    results = run_workers(_megatron_step, 2, ref, expected)
    for ok, grad_norm, diffs in results:
        assert ok
        assert abs(grad_norm - expected["norm"]) <= 1e-5 * expected["norm"]
        worst = max(diffs.values())
        assert worst <= 1e-6, {k: v for k, v in diffs.items() if v > 1e-6}

