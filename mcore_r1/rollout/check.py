"""Refit parity check: do vLLM's log-probs follow Megatron after in-place refits?

  python -m mcore_r1.rollout.check --hf DIR [--train-tp N --train-pp N --rollout-tp N]
                                   [--refits 3 --perturb 0.02 --max-tol 1e-3 --mean-tol 1e-4]

Builds the Megatron model at the training layout from DIR and a colocated vLLM engine from the
same DIR, then `--refits` times: adds seeded noise to the Megatron weights (so vLLM's start-up
weights are stale and only a working refit can pass), refits, samples with vLLM and compares
the sampled tokens' log-probs with Megatron's recomputation. Prints one line per refit and
exits 1 when any refit is above tolerance. With TP x PP > 1 it re-executes itself under
torchrun; launched by torchrun or srun it joins that world.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from mcore_r1.models.registry import text_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="Hugging Face model directory")
    p.add_argument("--train-tp", type=int, default=1)
    p.add_argument("--train-pp", type=int, default=1)
    p.add_argument("--train-dp", type=int, default=1, help="data-parallel replicas (world = TP x PP x DP)")
    p.add_argument("--rollout-tp", type=int, default=1)
    p.add_argument("--refits", type=int, default=3, help="consecutive refits to check")
    p.add_argument("--perturb", type=float, default=0.02,
                   help="std of the seeded noise added to the weights before each refit")
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-tol", type=float, default=1e-3)
    p.add_argument("--mean-tol", type=float, default=1e-4)
    return p.parse_args(argv)


def relaunch_under_torchrun(world: int) -> None:
    if "WORLD_SIZE" in os.environ or world == 1:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", "-m", "mcore_r1.rollout.check", *sys.argv[1:]]
    os.execv(sys.executable, cmd)


def perturb(model: torch.nn.Module, std: float, seed: int) -> None:
    """Seeded noise on every parameter. Replicated tensors (norms) get the same noise on every
    TP rank (seed from the name); TP shards get rank-specific noise. A tied output layer held
    by the last pipeline stage gets the embedding's noise: Megatron keeps the two copies equal
    (their gradients are all-reduced together), and so must a fake update."""
    from megatron.core import parallel_state as mpu

    if std <= 0:
        return
    tp_rank = mpu.get_tensor_model_parallel_rank()
    tied = {n for n, m in model.named_modules()
            if getattr(m, "share_embeddings_and_output_weights", False)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = name[:-len("output_layer.weight")]
            if name.endswith("output_layer.weight") and owner.rstrip(".") in tied:
                name = owner + "embedding.word_embeddings.weight"
            g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)))
            if getattr(p, "tensor_model_parallel", False):
                g.manual_seed(g.initial_seed() + 7919 * tp_rank)
            p.add_(torch.randn(p.shape, generator=g) * std)


def run_check(model_dir: str, train_tp: int, train_pp: int, rollout_tp: int, refits: int = 3,
              perturb_std: float = 0.02, bucket_bytes: int = 64 << 20, num_prompts: int = 4,
              max_tokens: int = 16, max_tol: float = 1e-3, mean_tol: float = 1e-4,
              report=print) -> list[dict]:
    """The check on an already launched world (every rank calls it); returns per-refit rows."""
    import torch.distributed as dist

    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.rollout.colocated import ColocatedEngine, SamplingOptions
    from mcore_r1.models.builder import VL_FAMILIES, family_of
    from mcore_r1.rollout.parity import logprob_parity, random_prompts, vl_prompts
    from mcore_r1.rollout.refit import RefitSource, refit

    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialize_parallel(ParallelDims(world, tp=train_tp, pp=train_pp))
    model, hf = load_hf_model(model_dir, ModelLayout(tp=train_tp, pp=train_pp))
    vocab = text_config(hf)["vocab_size"]
    engine = ColocatedEngine(model_dir, rollout_tp=rollout_tp, max_model_len=512)
    src = RefitSource.from_megatron(model, hf, tp=train_tp)
    processed = None
    if family_of(hf) in VL_FAMILIES:  # image prompts, so the vision tower is checked too
        prompts, processed = vl_prompts(model_dir, num_prompts, seed=0)
    else:
        prompts = random_prompts(num_prompts, 40, min(vocab, 1500), seed=0)
    rows = []
    for step in range(refits):
        perturb(model, perturb_std, seed=step + 1)
        metrics = refit(engine, src, bucket_bytes=bucket_bytes)
        parity = logprob_parity(engine, model, hf, prompts, SamplingOptions(
            n=2, temperature=1.0, max_tokens=max_tokens, seed=step), processed)
        row = dict(refit=step, max_diff=parity.max_diff, mean_diff=parity.mean_diff,
                   tokens=parity.tokens, ok=parity.ok(max_tol, mean_tol), **metrics.as_dict(""),
                   path=metrics.path)
        rows.append(row)
        if dist.get_rank() == 0:
            report(f"refit {step}: max |logprob diff| {parity.max_diff:.3e}, mean "
                   f"{parity.mean_diff:.3e} over {parity.tokens} tokens; {metrics.path} path "
                   f"{metrics.seconds:.3f}s {metrics.bytes / 2**20:.1f} MiB "
                   f"{'OK' if row['ok'] else 'ABOVE TOLERANCE'}")
    engine.close()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    relaunch_under_torchrun(args.train_tp * args.train_pp * args.train_dp)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(29500 + os.getpid() % 2000))):
        os.environ.setdefault(key, value)
    from mcore_r1.parallel.runtime import destroy_parallel

    rows = run_check(args.hf, args.train_tp, args.train_pp, args.rollout_tp, args.refits,
                     args.perturb, int(args.bucket_mb * 2**20), args.prompts, args.max_tokens,
                     args.max_tol, args.mean_tol)
    destroy_parallel()
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
