"""Device selection: the one place that decides between CUDA and CPU.

Everything else in mcore_r1 asks this module for its device and collective backend instead of
calling `.cuda()` itself, so the same code runs on a GPU cluster and on a 2-core laptop. When CUDA
is absent, `ensure_runtime()` also switches on the CPU compatibility layer that Megatron-Core
needs (see `cpu_compat`).
"""

from __future__ import annotations

import os

import torch


def cuda_available() -> bool:
    """True when a usable CUDA device exists (not merely a CUDA build of torch)."""
    if os.environ.get("MCORE_R1_FORCE_CPU") == "1":
        return False
    return torch.cuda.is_available()


def transformer_engine_available() -> bool:
    """TransformerEngine is importable (it is only ever installed on GPU machines)."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def local_rank() -> int:
    """Rank of this process on its node, as set by torchrun, Ray or Slurm."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def get_device() -> torch.device:
    """The device this process computes on: its own GPU, or the CPU."""
    if cuda_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def distributed_backend() -> str:
    """NCCL between GPUs, gloo otherwise."""
    return "nccl" if cuda_available() else "gloo"


def default_dtype_name() -> str:
    """bf16 where the hardware trains in it well (GPU), fp32 on CPU."""
    return "bfloat16" if cuda_available() else "float32"


def ensure_runtime() -> torch.device:
    """Pin this process to its device and, on CPU, activate the Megatron compatibility layer."""
    device = get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        from mcore_r1.parallel import cpu_compat

        cpu_compat.activate()
    return device
