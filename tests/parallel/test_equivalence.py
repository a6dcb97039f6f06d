"""TP=1, TP=2 and PP=2 give the unsharded model's logits and gradients (float32, 1e-5).

Each layout runs on real processes joined by gloo (2 processes for TP=2 / PP=2), with the
reference weights sharded by hand, through Megatron's forward-backward schedule.
"""

import functools

import pytest

from tests.dist_utils import run_workers
from tests.parallel import gpt_harness as h

TOL = 1e-5


def _reference(rank, world_size, tied):
    return h.reference(tied)


@functools.lru_cache(maxsize=None)
def reference(tied: bool) -> dict:
    return run_workers(_reference, 1, tied)[0]


def _check(results, expect_logits_on):
    assert [("logits" in r) for r in results] == expect_logits_on
    worst = {}
    for rank, diffs in enumerate(results):
        assert any(k.startswith("grad:") for k in diffs), f"rank {rank} reported no gradients"
        for key, value in diffs.items():
            worst[f"rank{rank}/{key}"] = value
    bad = {k: v for k, v in worst.items() if not v <= TOL}
    assert not bad, f"differences above {TOL}: {bad}"


def test_reference_loss_is_cross_entropy_of_its_logits():
    import torch

    ref = reference(False)
    _, labels = h.make_batch()
    expected = torch.nn.functional.cross_entropy(ref["logits"].reshape(-1, h.VOCAB), labels.reshape(-1))
    assert abs(expected.item() - ref["loss"]) < 1e-6
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())


@pytest.mark.parametrize(
    "tp,pp,tied,sp",
    [
        pytest.param(1, 1, True, False, id="tp1"),
        pytest.param(2, 1, True, False, id="tp2"),
        pytest.param(2, 1, False, False, id="tp2-untied"),
        pytest.param(1, 2, False, False, id="pp2"),
    ],
)
def test_layout_matches_unsharded(tp, pp, tied, sp):
    world = tp * pp
    results = run_workers(h.sharded_run, world, reference(tied), tp, pp, tied, sp)
    last_stage = [pp == 1 or rank == world - 1 for rank in range(world)]
    _check(results, last_stage)
