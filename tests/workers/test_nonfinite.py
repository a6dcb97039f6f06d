"""`trainer.nonfinite`: a NaN gradient never reaches the weights, on Megatron's real optimizer.

Two ranks (TP=2) with the NaN on one rank's shard only: the gradient norm is reduced over the
model-parallel group, so both ranks see it and take the same decision.
"""

import math

import pytest
import torch

from tests.dist_utils import run_workers
from tests.parallel import gpt_harness as h


def _step_with_nan(rank, world_size, policy, inject=True):
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers.hybrid import NonFiniteError, guarded_step

    initialize_parallel(ParallelDims(world_size, tp=2))
    model = h.build_gpt(h.gpt_config(2, 1), tied=True)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0,
                                                 params_dtype=torch.float32), [ddp])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp.zero_grad_buffer()
    opt.zero_grad()
    tokens, labels = h.make_batch()
    pos = torch.arange(h.SEQ).unsqueeze(0).expand(h.MICRO_BATCHES, -1)
    loss = vocab_parallel_cross_entropy(ddp(tokens, pos, h.causal_mask()).contiguous(), labels).mean()
    loss.backward()
    ddp.finish_grad_sync()
    if inject and mpu.get_tensor_model_parallel_rank() == 1:  # one shard of one sharded weight
        next(p for n, p in model.named_parameters() if "linear_fc1.weight" in n).main_grad[0, 0] = math.nan
    try:
        stepped, norm = guarded_step(opt, "actor", float(loss), policy)
    except NonFiniteError as err:
        return {"error": str(err)}
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    return {"stepped": stepped, "norm": norm, "changed": changed, "finite": finite}


def test_skip_leaves_the_weights_untouched():
    for result in run_workers(_step_with_nan, 2, "skip"):
        assert result["stepped"] is False and math.isnan(result["norm"])
        assert result["changed"] == [] and result["finite"]


def test_stop_names_the_metric():
    for result in run_workers(_step_with_nan, 2, "stop"):
        assert "actor/grad_norm = nan" in result["error"], result
        assert "trainer.nonfinite=stop" in result["error"]


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_finite_gradients_step_normally(policy):
    for result in run_workers(_step_with_nan, 2, policy, False):
        assert result["stepped"] and math.isfinite(result["norm"]) and result["finite"]
        assert len(result["changed"]) > 0
