"""Convert checkpoints between Hugging Face and Megatron-Core layouts, and check them.

  convert_hf_mcore.py hf-to-mcore --hf DIR --out DIR [--tp N --pp N]
  convert_hf_mcore.py mcore-to-hf --mcore DIR --out DIR [--tp N --pp N]
  convert_hf_mcore.py verify --hf DIR [--tp N --pp N] [--tol 1e-4]

TP x PP > 1 runs as that many processes: launched plainly, the script re-executes itself under
torchrun (`--nproc-per-node TP*PP`); launched by torchrun or srun it joins that world. All the
conversion logic lives in `mcore_r1.models.convert`.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("hf-to-mcore", "HF checkpoint -> Megatron distributed checkpoint"),
                            ("mcore-to-hf", "Megatron checkpoint -> sharded HF safetensors"),
                            ("verify", "compare Megatron and transformers logits")):
        p = sub.add_parser(name, help=help_text)
        if name == "mcore-to-hf":
            p.add_argument("--mcore", required=True,
                           help="mcore_r1 Megatron checkpoint: a converter output, a training "
                                "checkpoint (checkpoints/step_N), or a run directory (its latest)")
        else:
            p.add_argument("--hf", required=True, help="Hugging Face checkpoint directory")
        if name != "verify":
            p.add_argument("--out", required=True, help="output directory (must not exist)")
            p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        else:
            p.add_argument("--tol", type=float, default=1e-4, help="max allowed |logit diff|")
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert at")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert at")
    return parser.parse_args(argv)


def relaunch_under_torchrun(world: int) -> None:
    """Re-execute this command as `world` processes when not already inside a launched world."""
    if "WORLD_SIZE" in os.environ or world == 1:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", os.path.abspath(__file__), *sys.argv[1:]]
    os.execv(sys.executable, cmd)


def main(argv=None) -> int:
    args = parse_args(argv)
    if argv is None:  # run as a command (not called from Python): start as a CPU worker would
        from mcore_r1.parallel.device import restart_with_cpu_env

        restart_with_cpu_env()
    relaunch_under_torchrun(args.tp * args.pp)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))

    import torch.distributed as dist

    from mcore_r1.models import convert
    from mcore_r1.models.parity import max_logit_diff
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import destroy_parallel, initialize_parallel

    world = int(os.environ["WORLD_SIZE"])
    initialize_parallel(ParallelDims(world, tp=args.tp, pp=args.pp))
    layout = ModelLayout(tp=args.tp, pp=args.pp)
    rank0 = dist.get_rank() == 0
    status = 0
    try:
        if args.command == "hf-to-mcore":
            out = convert.hf_to_mcore(args.hf, args.out, layout, overwrite=args.overwrite)
            rank0 and print(f"wrote Megatron checkpoint {out} (saved at TP={args.tp} PP={args.pp})")
        elif args.command == "mcore-to-hf":
            out = convert.mcore_to_hf(args.mcore, args.out, layout, overwrite=args.overwrite)
            rank0 and print(f"wrote Hugging Face checkpoint {out}")
        else:
            diff = max_logit_diff(args.hf, layout)
            ok = diff <= args.tol
            rank0 and print(f"max |logit diff| at TP={args.tp} PP={args.pp}: {diff:.3e} "
                            f"({'ok' if ok else 'FAIL'}, tolerance {args.tol:g})")
            status = 0 if ok else 1
    finally:
        destroy_parallel()
    return status


if __name__ == "__main__":
    sys.exit(main())
