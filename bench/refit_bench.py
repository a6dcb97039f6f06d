"""Refit benchmark: Megatron (TP=2) -> colocated vLLM (rollout TP=2), Qwen2.5-0.5B shape.

Runs as two processes (re-executes itself under torchrun). A random float32 model of
Qwen2.5-0.5B's shape is written once, loaded into Megatron at TP=2 and into a vLLM engine
spread over the same two processes. Each refit path is timed (median of `--repeats` after a
warm-up) and divided by a baseline measured in the same run on the same rank: a plain
memory copy (`Tensor.copy_`, in 256 MiB chunks) of as many bytes as that path handed to vLLM.

  zero-gather: each rank converts its own shard; targets <= 2x the copy
  general:     full tensors gathered over TP (shared memory between the two processes),
               vLLM slices them; target <= 4x

For the general path a second reference is printed: a gloo all-gather over the TP group of the
same bytes, what a gathering refit would pay for transport through torch.distributed on CPU.

`--cpu-weights` picks vLLM's CPU weight layout (see `rollout.colocated`): "plain" (default
here) is the layout built for refits; "packed" (the trainer's default) re-packs every layer
for oneDNN on each refit, which bounds its ratio whatever the refit does.

  ./run.sh python bench/refit_bench.py [--workdir DIR] [--repeats 3] [--cpu-weights packed]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import make_model  # noqa: E402  (same model, one definition)

CHUNK = 256 << 20


def memcpy_seconds(nbytes: int) -> float:
    """Time to copy `nbytes` between two buffers (chunked so memory stays bounded)."""
    src = torch.randn(CHUNK // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    start = time.perf_counter()
    left = nbytes
    while left > 0:
        n = min(left, CHUNK) // 4
        dst[:n].copy_(src[:n])
        left -= n * 4
    return time.perf_counter() - start


def allgather_seconds(nbytes: int) -> float:
    """Time to all-gather `nbytes` in total over the default group (chunked)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    piece = torch.randn(CHUNK // 4 // world)
    out = torch.empty(piece.numel() * world)
    dist.barrier()
    start = time.perf_counter()
    left = nbytes
    while left > 0:
        n = min(left, CHUNK) // 4 // world
        dist.all_gather_into_tensor(out[:n * world], piece[:n])
        left -= n * 4 * world
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the model is written (kept)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=256)
    parser.add_argument("--cpu-weights", choices=("plain", "packed"), default="plain",
                        help="vLLM's CPU weight layout (rollout.cpu_weights); plain is the one "
                             "built for refits, packed is the training default (faster decode)")
    args = parser.parse_args()
    work = Path(args.workdir or Path(tempfile.gettempdir()) / "mcore_r1_refit_bench")
    if "WORLD_SIZE" not in os.environ:
        if not (work / "hf" / "config.json").exists():
            shutil.rmtree(work / "hf", ignore_errors=True)
            print(f"writing a random Qwen2.5-0.5B-shaped model to {work / 'hf'} ...", flush=True)
            make_model(work / "hf", "float32")
        from mcore_r1.parallel.device import cpu_process_env

        # started like a training run's workers (huge pages for big allocations)
        os.execve(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc-per-node=2", os.path.abspath(__file__), *sys.argv[1:],
                                   "--workdir", str(work)], {**os.environ, **cpu_process_env()})
    run(work / "hf", args.repeats, int(args.bucket_mb * 2**20), args.cpu_weights)


def run(model_dir: Path, repeats: int, bucket_bytes: int, cpu_weights: str) -> None:
    import torch.distributed as dist

    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.rollout.colocated import ColocatedEngine
    from mcore_r1.rollout.refit import RefitSource, refit

    initialize_parallel(ParallelDims(2, tp=2))
    model, hf = load_hf_model(model_dir, ModelLayout(tp=2))
    engine = ColocatedEngine(model_dir, rollout_tp=2, max_model_len=256, skip_tokenizer_init=True,
                             cpu_weights=cpu_weights)
    src = RefitSource.from_megatron(model, hf, tp=2)
    rows = []
    for path in ("zero_gather", "general"):
        refit(engine, src, bucket_bytes=bucket_bytes, path=path)  # warm-up
        times, nbytes = [], 0
        for _ in range(repeats):
            dist.barrier()
            metrics = refit(engine, src, bucket_bytes=bucket_bytes, path=path)
            times.append(metrics.seconds)
            nbytes = metrics.bytes
        base = statistics.median(memcpy_seconds(nbytes) for _ in range(3))
        floor = allgather_seconds(nbytes) if path == "general" else None
        rows.append((path, statistics.median(times), nbytes, base, floor))
    rank = dist.get_rank()
    engine.close()  # with the external launcher this also tears down torch.distributed
    if rank == 0:
        print(f"model: Qwen2.5-0.5B shape, float32, training TP=2 -> rollout TP=2, "
              f"{torch.get_num_threads()} thread(s) per rank, bucket {bucket_bytes >> 20} MiB, "
              f"vLLM CPU weights {cpu_weights!r}")
        for path, seconds, nbytes, base, floor in rows:
            target = 2 if path == "zero_gather" else 4
            print(f"{path:12s} refit {seconds:7.3f} s  {nbytes / 2**30:5.2f} GiB/rank  "
                  f"memcpy {base:6.3f} s  ratio {seconds / base:5.2f}x (target <= {target}x)")
            if floor is not None:
                print(f"{'':12s} all-gather of the same bytes {floor:6.3f} s: refit is "
                      f"{seconds / floor:5.2f}x the transport floor")


if __name__ == "__main__":
    main()
