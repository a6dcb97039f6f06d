"""Two data-parallel ranks over gloo reproduce the whole-batch loss and gradients (1e-6).

Each rank holds half of the mini-batch, split further into micro-batches of unequal token
counts; the global normaliser is the all-reduced sum of the local counts; gradients are
accumulated over micro-batches and all-reduced (summed) over the ranks, as DDP would.
All modes and losses run inside one pair of processes to keep the test at a few seconds.
"""

import torch

from tests.algos import invariance as inv
from tests.algos import vectors as v
from tests.dist_utils import run_workers

# Rank 0: 7 | 3+5 tokens; rank 1: 1+8 | 2 | 6+4 tokens.
RANK_SPLITS = [[[0], [1, 2]], [[3, 4], [5], [6, 7]]]


def _dp_worker(rank, world_size):
    import torch.distributed as dist

    from mcore_r1.parallel.runtime import init_torch_distributed

    init_torch_distributed()
    assert dist.get_backend() == "gloo"
    p = inv.make_problem()
    results = {}
    for mode in inv.MODES:
        for loss_name in inv.LOSSES:
            loss, grad = inv.run_split(p, RANK_SPLITS[rank], mode, loss_name,
                                       group_reduce=lambda n: n.all_reduce())
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            results[(mode, loss_name)] = (loss, grad)
    return results


def test_two_dp_ranks_match_the_whole_batch():
    per_rank = run_workers(_dp_worker, 2, timeout_s=120)
    p = inv.make_problem()
    for mode in inv.MODES:
        for loss_name in inv.LOSSES:
            want_loss, want_grad = inv.whole(p, mode, loss_name)
            for rank in range(2):
                got_loss, got_grad = per_rank[rank][(mode, loss_name)]
                v.assert_close(got_loss, want_loss, tol=1e-6)
                v.assert_close(got_grad, want_grad, tol=1e-6)
    assert torch.equal(per_rank[0][("token-mean", "ppo_clip")][1],
                       per_rank[1][("token-mean", "ppo_clip")][1])
