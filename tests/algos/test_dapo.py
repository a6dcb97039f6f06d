"""DAPO: overlong reward shaping and dynamic sampling of informative groups."""

import pytest
import torch

from mcore_r1.algos import apply_overlong_penalty, fill_batch, keep_informative, overlong_penalty
from tests.algos.vectors import assert_close


def test_overlong_penalty_matches_the_paper():
    lengths = [16000, 16384, 16385, 18432, 20480, 21000]
    got = overlong_penalty(torch.tensor(lengths), max_len=20480, buffer_len=4096)
    # reference 6.10, paper/EasyR1 column: ((20480 - 4096) - L) / 4096 on the ramp, -1 beyond
    assert_close(got, [0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0], tol=1e-15)
    assert_close(overlong_penalty(torch.tensor(lengths), 20480, 4096, penalty_factor=0.5)[3], -0.25)
    assert (overlong_penalty(torch.tensor(lengths), 20480, 0) == 0).all()


def test_apply_overlong_penalty_on_the_last_valid_token():
    scores = torch.tensor([[0.0, 0.0, 1.0, float("nan")], [0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    shaped, penalty = apply_overlong_penalty(scores, mask, max_len=4, buffer_len=2)
    # lengths 3 and 4: ramp (2 - 3)/2 = -0.5 and (2 - 4)/2 = -1
    assert_close(penalty, [-0.5, -1.0], tol=1e-15)
    assert_close(shaped, [[0.0, 0.0, 0.5, 0.0], [0.0, 1.0, 1.0, 0.0]], tol=1e-15)


GROUPS = ["g1"] * 4 + ["g2"] * 4 + ["g3"] * 4 + ["g4"]
ACC = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1, 1]


def test_keep_informative_groups():
    keep = keep_informative(GROUPS, torch.tensor(ACC, dtype=torch.float64))
    assert keep.tolist() == [False] * 8 + [True] * 4 + [True]  # verl: std > 0 or singleton
    keep = keep_informative(GROUPS, torch.tensor(ACC, dtype=torch.float64), keep_singletons=False)
    assert keep.tolist() == [False] * 8 + [True] * 4 + [False]
    with pytest.raises(ValueError, match="scores has 1 non-finite"):
        keep_informative([0, 0], torch.tensor([1.0, float("nan")]))


def rounds(*groups_per_round):
    """A fake generator: each round yields (rows, index, scores); rows are labelled strings."""
    it = iter(groups_per_round)

    def generate():
        spec = next(it)  # list of (label, scores)
        rows = [f"{label}{k}" for label, s in spec for k in range(len(s))]
        index = [label for label, s in spec for _ in s]
        scores = torch.tensor([x for _, s in spec for x in s], dtype=torch.float64)
        return rows, index, scores
    return generate


def select(rows, idx):
    return [rows[i] for i in idx.tolist()]


def test_fill_batch_keeps_generating_until_full_and_trims_whole_groups():
    gen = rounds([("a", [1, 1]), ("b", [0, 1]), ("c", [0, 0])],
                 [("d", [1, 1]), ("e", [1, 0]), ("f", [0.5, 0.2])])
    pieces, stats = fill_batch(gen, select, target_groups=2, max_tries=5)
    assert pieces == [["b0", "b1"], ["e0", "e1"]]  # f is informative but not needed
    assert (stats.tries, stats.kept_groups, stats.dropped_groups, stats.generated_groups) == (2, 2, 3, 6)
    assert stats.metrics()["dynamic_sampling/dropped_frac"] == 0.5


def test_fill_batch_gives_up_after_max_tries_with_the_counts():
    gen = rounds([("a", [1, 1])], [("b", [0, 0])], [("c", [1, 0])])
    with pytest.raises(RuntimeError, match="kept 0 of 1 groups after 2 rounds \\(2 of 2 groups"):
        fill_batch(gen, select, target_groups=1, max_tries=2)
    gen = rounds([("a", [1, 1])], [("b", [0, 0])], [("c", [1, 0])])
    pieces, stats = fill_batch(gen, select, target_groups=1, max_tries=0)  # unlimited
    assert pieces == [["c0", "c1"]] and stats.tries == 3
