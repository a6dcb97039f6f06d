"""Loss aggregation modes: worked values, masking, and invariance to how the batch is split."""

import pytest
import torch

from mcore_r1.algos import AGG_MODES, LossNormaliser, aggregate_loss, check_agg_mode
from tests.algos import invariance as inv
from tests.algos import vectors as v

# Per-token PPO loss of reference 6.8 (clip 0.2/0.2, c = 3), NaN junk in padding.
PPO_LOSS = [[-0.692819, -0.404144, -0.635084, -0.577349], [3.464096, 0.923759, 1.154699, 0.0],
            [-0.692819, -0.519614, 0.0, 0.0], [1.299997, 0.849998, 0.799998, 2.499995],
            [-1.199998, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def row_sums():
    return [sum(PPO_LOSS[i][t] for t in range(v.T) if v.valid(i, t)) for i in range(v.B)]


@pytest.mark.parametrize("mode,reference", [
    ("token-mean", 0.368866), ("seq-mean-token-mean", 0.137742), ("seq-mean-token-sum", 1.045119),
    ("seq-mean-token-sum-norm", 0.261280),  # Dr.GRPO (oat/TRL): total / (6 sequences x 4)
])
def test_modes_on_the_reference_loss_matrix(mode, reference):
    sums = row_sums()
    plain = {"token-mean": sum(sums) / v.N_VALID,
             "seq-mean-token-mean": sum(s / n for s, n in zip(sums, v.LENS)) / v.B,
             "seq-mean-token-sum": sum(sums) / v.B,
             "seq-mean-token-sum-norm": sum(sums) / (v.B * 4)}[mode]
    got = aggregate_loss(v.tensor(PPO_LOSS), v.mask(), mode, norm_len=4)
    v.assert_close(got, plain, tol=1e-12)
    v.assert_close(got, reference)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_fully_masked_rows_count_neither_as_tokens_nor_sequences(mode):
    loss = torch.cat([v.tensor(PPO_LOSS), torch.full((2, v.T), float("nan"), dtype=torch.float64)])
    mask = torch.cat([v.mask(), torch.zeros(2, v.T, dtype=torch.bool)])
    v.assert_close(aggregate_loss(loss, mask, mode, norm_len=4),
                   aggregate_loss(v.tensor(PPO_LOSS), v.mask(), mode, norm_len=4), tol=1e-15)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_empty_selection_is_zero_with_zero_gradient(mode):
    x = torch.full((2, 3), float("nan"), dtype=torch.float64, requires_grad=True)
    loss = aggregate_loss(x, torch.zeros(2, 3), mode, norm_len=3)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_gradients_of_each_mode():
    x = v.tensor(PPO_LOSS).requires_grad_(True)
    for mode in AGG_MODES:
        x.grad = None
        aggregate_loss(x, v.mask(), mode, norm_len=4).backward()
        scale = {"token-mean": [1 / 17] * v.B, "seq-mean-token-mean": [1 / (6 * n) for n in v.LENS],
                 "seq-mean-token-sum": [1 / 6] * v.B, "seq-mean-token-sum-norm": [1 / 24] * v.B}[mode]
        v.assert_close(x.grad, v.per_token(scale), tol=1e-15)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'seq'; known: token-mean"):
        check_agg_mode("seq")
    with pytest.raises(ValueError, match="needs norm_len"):
        aggregate_loss(v.tensor(PPO_LOSS), v.mask(), "seq-mean-token-sum-norm")
    bad = v.tensor(PPO_LOSS)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="loss_mat has 1 non-finite"):
        aggregate_loss(bad, v.mask())


def test_normaliser_counts():
    n = LossNormaliser.of(v.mask()) + LossNormaliser.of(torch.zeros(3, 2))
    assert (n.tokens, n.seqs) == (17.0, 6.0)
    assert n.all_reduce() == n  # no process group: unchanged


# Unequal micro-batches: token counts 7 | 3+5+1 | 8+2 | 6+4 -> 7, 9, 10, 10.
SPLITS = [[0], [1, 2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("loss_name", inv.LOSSES)
@pytest.mark.parametrize("mode", inv.MODES)
def test_micro_batches_reproduce_the_whole_batch(mode, loss_name):
    p = inv.make_problem()
    want_loss, want_grad = inv.whole(p, mode, loss_name)
    got_loss, got_grad = inv.run_split(p, SPLITS, mode, loss_name)
    assert torch.isfinite(want_grad).all() and want_grad.abs().sum() > 0
    v.assert_close(got_loss, want_loss, tol=1e-6)
    v.assert_close(got_grad, want_grad, tol=1e-6)


def test_mean_of_micro_batch_means_would_differ():
    # Guard that the splits above are a real test: naive per-micro-batch means disagree.
    p = inv.make_problem()
    want, _ = inv.whole(p, "token-mean", "ppo_clip")
    w = p["w0"].clone()
    naive = sum(inv.micro_loss(p, w, rows, "token-mean", "ppo_clip", None) for rows in SPLITS)
    assert abs(float(naive) / len(SPLITS) - float(want)) > 1e-3
