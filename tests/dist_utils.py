"""Run a function on N real processes joined by a gloo process group (CPU tests).

`run_workers(fn, world_size, *args)` spawns `world_size` fresh interpreters, sets the usual
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT environment, calls `fn(rank, world_size, *args)`
in each and returns their return values in rank order. Every wait is bounded: a worker that
hangs or dies fails the test with its rank named instead of stalling the suite.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.ports import free_port


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # Two cores: one intra-op thread per worker keeps the processes from fighting.
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout_s: float = 300.0) -> list:
    """Call `fn(rank, world_size, *args)` on `world_size` spawned processes; return results."""
    with tempfile.TemporaryDirectory(prefix="mcore_r1_dist_") as out_dir:
        ctx = mp.start_processes(
            _entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
            join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        death = None
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed workers still running after {timeout_s:.0f}s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            death = err  # a worker's own traceback, if it wrote one, is more useful: read below
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        records = {}
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pt"
            if path.exists():
                records[rank] = torch.load(path, weights_only=False)
        for rank, record in records.items():
            if not record["ok"]:
                raise RuntimeError(f"worker rank {rank} failed:\n{record['error']}")
        missing = [rank for rank in range(world_size) if rank not in records]
        if missing:
            raise RuntimeError(f"worker rank(s) {missing} exited without a result ({death})")
        return [records[rank]["result"] for rank in range(world_size)]
