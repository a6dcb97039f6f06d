"""Process-group bring-up for training workers.

One call, `initialize_parallel(dims)`, turns a launched process (torchrun, a Ray worker, or a
Slurm task with the usual RANK / WORLD_SIZE / MASTER_ADDR environment) into a Megatron-Core rank:
torch.distributed with NCCL on GPUs and gloo on CPU, then Megatron's TP/PP/CP/DP/EP groups, then
seeded RNG streams. It returns Megatron's `ProcessGroupCollection` so callers pass groups
explicitly rather than reaching for globals.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from mcore_r1.parallel import device as devmod
from mcore_r1.parallel.dims import LayoutError, ParallelDims


def init_torch_distributed(timeout_minutes: int = 10) -> None:
    """Join the default process group from the environment (env:// rendezvous)."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed needs {', '.join(missing)} in the environment; launch with "
            "torchrun, Ray workers or srun, or set them for a single process "
            "(RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500)"
        )
    device = devmod.ensure_runtime()
    dist.init_process_group(
        backend=devmod.distributed_backend(),
        timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=device if device.type == "cuda" else None,
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's per-TP-rank RNG streams.

    The data-parallel stream gets `seed` on every rank; the tensor-parallel stream gets
    `seed + 2718 + tp_rank` (Megatron's convention), so sharded dropout differs per TP rank.
    On CPU the streams live in the compatibility layer's tracker, which Megatron's own seeding
    function fills like its CUDA one.
    """
    from megatron.core.tensor_parallel import random as mrandom

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    mrandom.model_parallel_cuda_manual_seed(seed)


def initialize_parallel(dims: ParallelDims, seed: int = 1234, timeout_minutes: int = 10):
    """Bring up torch.distributed and Megatron's model-parallel groups for `dims`.

    Returns the `ProcessGroupCollection` for the TP/PP/CP/DP/EP groups of this rank.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.process_groups_config import ProcessGroupCollection

    init_torch_distributed(timeout_minutes)
    if dist.get_world_size() != dims.world_size:
        raise LayoutError(
            f"the parallel layout expects {dims.world_size} processes ({dims.describe()}) but "
            f"{dist.get_world_size()} were launched"
        )
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.cp,
        expert_model_parallel_size=dims.ep,
        distributed_timeout_minutes=timeout_minutes,
        # Megatron's optimizer asks for its gloo DP groups by name, on CPU too.
        create_gloo_process_groups=True,
    )
    seed_everything(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
