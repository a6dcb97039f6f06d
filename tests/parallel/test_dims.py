"""Parallel layout arithmetic and its error messages."""

import pytest

from mcore_r1.parallel.dims import LayoutError, ParallelDims


def test_dp_is_what_is_left():
    dims = ParallelDims(16, tp=2, pp=2, cp=2)
    assert (dims.model_parallel_size, dims.dp) == (8, 2)
    assert dims.describe() == "world 16 = DP 2 x TP 2 x PP 2 x CP 2"


def test_world_not_divisible_shows_arithmetic():
    with pytest.raises(LayoutError) as err:
        ParallelDims(6, tp=4)
    assert "world size 6 is not divisible by TP x PP x CP = 4 x 1 x 1 = 4 (6 % 4 = 2)" in str(err.value)


@pytest.mark.parametrize(
    "kwargs,model,needle",
    [
        (dict(world_size=3, tp=3), (4, 6, 2), "2 query groups (KV heads) are not divisible by TP=3 (2 % 3 = 2)"),
        (dict(world_size=4, tp=4), (4, 6, 6), "6 attention heads are not divisible by TP=4 (6 % 4 = 2)"),
        (dict(world_size=3, pp=3), (4, 4, 2), "4 layers are not divisible by PP=3 (4 % 3 = 1)"),
    ],
)
def test_model_checks(kwargs, model, needle):
    with pytest.raises(LayoutError) as err:
        ParallelDims(**kwargs).check_model(*model)
    assert needle in str(err.value)


def test_rejects_non_positive_sizes():
    with pytest.raises(LayoutError, match="tp must be a positive integer"):
        ParallelDims(2, tp=0)
