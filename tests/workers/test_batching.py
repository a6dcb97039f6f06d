"""Token-budget planning and packing, checked against hand-worked numbers."""

import pytest
import torch

from mcore_r1.workers.batching import (
    Sample, block_causal_mask, pack, pad, plan_micro_batches, scatter_back,
)


def test_first_fit_decreasing_by_hand():
    # Sorted: 7(i1) 5(i3) 4(i0) 3(i2) 2(i4) 1(i5), budget 8:
    # 7 -> bin0 [room 1]; 5 -> bin1 [3]; 4 -> bin2 [4]; 3 -> bin1 [0]; 2 -> bin2 [2]; 1 -> bin0 [0]
    assert plan_micro_batches([4, 7, 3, 5, 2, 1], 8) == [[1, 5], [2, 3], [0, 4]]


def test_plan_is_deterministic_and_ties_go_by_index():
    assert plan_micro_batches([2, 2, 2], 4) == [[0, 1], [2]]
    assert plan_micro_batches([3, 3, 3], 3) == [[0], [1], [2]]


def test_too_long_sequence_names_index_and_length():
    with pytest.raises(ValueError, match=r"sequence 2 has 9 tokens.*micro_batch_tokens=8"):
        plan_micro_batches([1, 8, 9], 8)


def test_scatter_back_restores_order():
    plan = [[1, 5], [2, 3], [0, 4]]
    results = [["b", "f"], ["c", "d"], ["a", "e"]]
    assert scatter_back(plan, results, 6) == list("abcdef")
    with pytest.raises(ValueError, match=r"sample\(s\) \[6\]"):
        scatter_back(plan, results, 7)


def _samples():
    return [Sample(torch.tensor([10, 11, 12]), prompt_len=1),
            Sample(torch.tensor([20, 21]), prompt_len=1),
            Sample(torch.tensor([30, 31, 32, 33]), prompt_len=2)]


def test_pack_mask_layout_by_hand():
    mb = pack(_samples(), fmt="mask")
    assert mb.input_ids.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 33]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert mb.labels[0, :8].tolist() == [11, 12, 20, 21, 30, 31, 32, 33]
    allowed = ~mb.attention_mask[0, 0]
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for start, n in ((0, 3), (3, 2), (5, 4)):
        expected[start:start + n, start:start + n] = torch.ones(n, n).tril().bool()
    assert torch.equal(allowed, expected)
    # Position t holds the value for target t+1: response tokens read t = start+P-1 .. start+L-2.
    values = torch.arange(9.0).unsqueeze(0)
    got = [v.tolist() for v in mb.split_response(values)]
    assert got == [[0.0, 1.0], [3.0], [6.0, 7.0]]


def test_pack_pads_to_multiple_with_a_separate_segment():
    mb = pack(_samples()[:2], fmt="mask", pad_to_multiple=4, pad_id=7)
    assert mb.input_ids.tolist() == [[10, 11, 12, 20, 21, 7, 7, 7]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert torch.equal(block_causal_mask([3, 2, 3]), mb.attention_mask)


def test_thd_params_cu_seqlens():
    mb = pack(_samples(), fmt="thd", device=torch.device("cpu"))
    p = mb.packed_seq_params
    assert mb.attention_mask is None and p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 9] and p.cu_seqlens_q.dtype == torch.int32
    assert p.max_seqlen_q == 4 and p.max_seqlen_kv == 4


def test_pad_layout_by_hand():
    mb = pad(_samples(), pad_id=0)
    assert mb.input_ids.tolist() == [[10, 11, 12, 0], [20, 21, 0, 0], [30, 31, 32, 33]]
    mask = mb.attention_mask  # [B, 1, T, T] after broadcasting: True = not attended
    assert mask.shape[-2:] == (4, 4)
    row1 = ~mask.expand(3, 1, 4, 4)[1, 0]
    assert row1.tolist() == [[True, False, False, False], [True, True, False, False],
                             [True, True, False, False], [True, True, False, False]]
    values = torch.arange(12.0).view(3, 4)
    assert [v.tolist() for v in mb.split_response(values)] == [[0.0, 1.0], [4.0], [9.0, 10.0]]


def test_mrope_positions_are_packed_along_the_last_axis():
    pos_a = torch.tensor([[0, 1, 2], [0, 5, 6], [0, 7, 8]])
    pos_b = torch.tensor([[0, 1], [0, 1], [0, 1]])
    mb = pack([Sample(torch.tensor([1, 2, 3]), 1, pos_a), Sample(torch.tensor([4, 5]), 1, pos_b)], fmt="mask")
    assert mb.position_ids.shape == (3, 1, 5)
    assert mb.position_ids[:, 0].tolist() == [[0, 1, 2, 0, 1], [0, 5, 6, 0, 1], [0, 7, 8, 0, 1]]


def test_bad_samples_are_refused():
    with pytest.raises(ValueError, match="prompt_len 0"):
        Sample(torch.tensor([1, 2]), prompt_len=0)
    with pytest.raises(ValueError, match="1-D"):
        Sample(torch.tensor([[1, 2]]), prompt_len=1)


def test_packing_setting_picks_the_format_and_refuses_unknown_names():
    from mcore_r1.workers import batching

    try:
        assert batching.packing_format() == "segments"  # CPU, no TransformerEngine
        batching.set_packing_format("mask")
        assert batching.packing_format() == "mask"
        assert pack(_samples(), device=torch.device("cpu")).attention_mask is not None
        batching.set_packing_format("auto")
        assert batching.packing_format() == "segments"
        with pytest.raises(ValueError, match="trainer.packing='blocks'"):
            batching.set_packing_format("blocks")
    finally:
        batching.set_packing_format("auto")
