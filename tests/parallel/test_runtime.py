"""Process-group bring-up: groups have the requested sizes and bad launches fail clearly."""

import pytest

from mcore_r1.parallel import LayoutError, ParallelDims
from tests.dist_utils import run_workers


def _group_sizes(rank, world_size, tp, pp):
    from megatron.core import parallel_state as mpu

    from mcore_r1.parallel.runtime import initialize_parallel

    import torch
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    pgs = initialize_parallel(ParallelDims(world_size, tp=tp, pp=pp), seed=5)
    with get_cuda_rng_tracker().fork():  # Megatron's tensor-parallel dropout stream
        drawn = torch.rand(4)
    return {
        "tp_stream": drawn,
        "tp": pgs.tp.size(), "pp": pgs.pp.size(), "dp": pgs.dp.size(),
        "tp_rank": mpu.get_tensor_model_parallel_rank(),
        "pp_rank": mpu.get_pipeline_model_parallel_rank(),
    }


def _mismatched_world(rank, world_size):
    from mcore_r1.parallel.runtime import initialize_parallel

    try:
        initialize_parallel(ParallelDims(4, tp=2))
    except LayoutError as err:
        return str(err)
    return None


def test_group_sizes_and_ranks_tp2():
    results = run_workers(_group_sizes, 2, 2, 1)
    assert [r["tp_rank"] for r in results] == [0, 1]
    assert all((r["tp"], r["pp"], r["dp"]) == (2, 1, 1) for r in results)
    import torch

    # Megatron's convention: TP rank r draws from seed + 2718 + r
    for r in results:
        expected = torch.rand(4, generator=torch.Generator().manual_seed(5 + 2718 + r["tp_rank"]))
        assert torch.equal(r["tp_stream"], expected)


def test_world_size_mismatch_is_named():
    messages = run_workers(_mismatched_world, 2)
    assert all("expects 4 processes" in m and "2 were launched" in m for m in messages)


def test_missing_rendezvous_environment(monkeypatch):
    from mcore_r1.parallel.runtime import init_torch_distributed

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="needs RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        init_torch_distributed()
