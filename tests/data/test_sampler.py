"""The resumable sampler: epochs are permutations, order depends on the seed, resume is exact."""

from __future__ import annotations

import pytest

from mcore_r1.data import ResumableSampler


def test_every_epoch_is_a_permutation_and_batches_cross_epochs():
    sampler = ResumableSampler(10, seed=3)
    drawn = [sampler.next_batch(4) for _ in range(5)]  # 20 indices = exactly two epochs
    flat = [i for batch in drawn for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation each epoch (P(equal) = 1/10!)
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 10


def test_seeded_order_and_no_shuffle():
    assert ResumableSampler(50, seed=1).next_batch(50) == ResumableSampler(50, seed=1).next_batch(50)
    assert ResumableSampler(50, seed=1).next_batch(50) != ResumableSampler(50, seed=2).next_batch(50)
    assert ResumableSampler(5, shuffle=False).next_batch(7) == [0, 1, 2, 3, 4, 0, 1]


def test_resume_continues_with_the_same_batches():
    straight = ResumableSampler(7, seed=5)
    expected = [straight.next_batch(3) for _ in range(6)]
    first = ResumableSampler(7, seed=5)
    head = [first.next_batch(3) for _ in range(2)]
    state = dict(first.state_dict())
    resumed = ResumableSampler(7, seed=5)
    resumed.load_state_dict(state)
    assert head + [resumed.next_batch(3) for _ in range(4)] == expected


def test_state_from_another_dataset_is_refused():
    state = ResumableSampler(7, seed=5).state_dict()
    with pytest.raises(ValueError, match="size=7 but this run has size=8"):
        ResumableSampler(8, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="empty dataset"):
        ResumableSampler(0)
