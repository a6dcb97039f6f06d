"""Refit across two real processes (gloo), tiny Qwen2.5, training TP x PP / rollout TP:

  2x1/2  zero-gather path: each rank converts its own shard, no collective; checked against
         vLLM's log-probs and, bit for bit, against the general path (vLLM slicing full
         tensors itself) on the same weights;
  2x1/1  general path: gather over TP, two rollout replicas (one per process);
  1x2/1  general path: broadcast over PP, two rollout replicas.

and, in a world of four (training TP=2 x DP=2), two rollout replicas of TP=2.

Each two-process layout runs three consecutive refits with different weights (the
four-process one two); after each one, vLLM's
log-probs of its sampled tokens must match Megatron's recomputation (max <= 1e-3, mean <= 1e-4).
"""

import pytest
import torch

from mcore_r1.models.tiny import ensure_tiny_model
from tests.dist_utils import run_workers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_tiny_model("qwen2", tmp_path_factory.mktemp("tiny")))


def _layout(rank, world, model_dir, tp, pp, rollout_tp):
    from mcore_r1.rollout.check import run_check

    return run_check(model_dir, tp, pp, rollout_tp, refits=3, report=lambda line: None)


@pytest.mark.parametrize("tp,pp,rollout_tp,path", [
    (2, 1, 1, "general"), (1, 2, 1, "general"),
], ids=["2x1-1", "1x2-1"])
def test_general_path_logprobs_agree(model_dir, tp, pp, rollout_tp, path):
    for rank_rows in run_workers(_layout, 2, model_dir, tp, pp, rollout_tp, timeout_s=240):
        assert len(rank_rows) == 3
        for row in rank_rows:
            assert row["path"] == path
            assert row["tokens"] > 0 and row["ok"], row
            # 64 MiB buckets: the tiny model's shards go over TP in one all-gather
            assert row["tp_collectives"] == (1 if tp > 1 else 0), row


def _zero_gather(rank, world, model_dir, cpu_weights):
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.rollout.check import perturb
    from mcore_r1.rollout.colocated import ColocatedEngine, SamplingOptions
    from mcore_r1.rollout.parity import logprob_parity, random_prompts
    from mcore_r1.rollout.refit import RefitSource, refit
    from tests.rollout.vllm_readback import vllm_weights

    initialize_parallel(ParallelDims(world, tp=2, pp=1))
    model, hf = load_hf_model(model_dir, ModelLayout(tp=2))
    engine = ColocatedEngine(model_dir, rollout_tp=2, max_model_len=256, cpu_weights=cpu_weights)
    src = RefitSource.from_megatron(model, hf, tp=2)
    prompts = random_prompts(3, 40, 1500, seed=1)
    rows = []
    for step in range(3):
        perturb(model, 0.02, seed=step + 1)
        # 64 KiB buckets: many TP exchanges, each reusing the one shared-memory buffer
        general = refit(engine, src, path="general", bucket_bytes=64 << 10)
        by_general = vllm_weights(engine.vllm_model())
        local = refit(engine, src)  # auto: must pick zero-gather here
        by_local = vllm_weights(engine.vllm_model())
        parity = logprob_parity(engine, model, hf, prompts,
                                SamplingOptions(n=2, max_tokens=16, seed=step))
        rows.append(dict(paths=(general.path, local.path), bytes=(general.bytes, local.bytes),
                         exchanges=general.tp_collectives,
                         differ=[n for n in by_general if not torch.equal(by_general[n], by_local[n])],
                         names=sorted(by_general) == sorted(by_local), parity=parity))
    engine.close()
    return rows


@pytest.mark.parametrize("cpu_weights", ["plain", "packed"])
def test_zero_gather_matches_general_path_bit_for_bit(model_dir, cpu_weights):
    for rank_rows in run_workers(_zero_gather, 2, model_dir, cpu_weights, timeout_s=240):
        for row in rank_rows:
            assert row["paths"] == ("general", "zero_gather")
            assert row["exchanges"] > 10
            assert row["bytes"][1] < 0.6 * row["bytes"][0]  # only this rank's blocks
            assert row["names"] and row["differ"] == [], row["differ"]
            p = row["parity"]
            assert p.tokens > 0 and p.max_diff <= 1e-3 and p.mean_diff <= 1e-4, p


def _replicas(rank, world, model_dir):
    from mcore_r1.rollout.check import run_check

    return run_check(model_dir, 2, 1, 2, refits=2, num_prompts=2, report=lambda line: None)


def test_two_rollout_replicas_of_tp2_in_a_world_of_four(model_dir):
    """Training TP=2 x DP=2; rollout TP=2 as two vLLM replicas (ranks 0-1 and 2-3)."""
    for rank_rows in run_workers(_replicas, 4, model_dir, timeout_s=300):
        for row in rank_rows:
            assert row["path"] == "zero_gather" and row["ok"] and row["tokens"] > 0, row


def test_replicas_split_the_batch():
    from mcore_r1.rollout.colocated import ColocatedEngine

    engine = ColocatedEngine.__new__(ColocatedEngine)
    engine.num_replicas = 3
    shares = []
    for replica in range(3):
        engine.replica = replica
        shares.append(engine.my_share(list(range(7))))
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
