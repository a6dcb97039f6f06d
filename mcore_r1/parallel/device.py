"""Device selection: the one place that decides between CUDA and CPU.

Everything else in mcore_r1 asks this module for its device and collective backend instead of
calling `.cuda()` itself, so the same code runs on a GPU cluster and on a 2-core laptop. When CUDA
is absent, `ensure_runtime()` also switches on the CPU compatibility layer that Megatron-Core
needs (see `cpu_compat`).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

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


def cpu_process_env() -> dict[str, str]:
    """Environment a CPU compute process should start with (glibc reads it at start-up).

    glibc serves allocations above 32 MiB (activations, gathered weights, checkpoint tensors)
    with fresh mmaps, and faulting those pages in 4 KiB at a time cost up to 3x the copy that
    fills them on the CI machine (a 512 MiB `torch.cat`: 0.107 s; 0.035 s into warm memory).
    `glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages: 0.035-0.040 s. A
    user's own GLIBC_TUNABLES wins; GPU processes keep the default."""
    if cuda_available() or "GLIBC_TUNABLES" in os.environ:
        return {}
    return {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def restart_with_cpu_env(argv: Optional[Sequence[str]] = None) -> None:
    """Re-execute this Python process (same pid, same arguments) with `cpu_process_env()` when
    it is missing; returns only when nothing had to change."""
    extra = cpu_process_env()
    if extra:
        args = list(sys.orig_argv[1:]) if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, *args], {**os.environ, **extra})
