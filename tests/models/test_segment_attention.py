"""Per-sequence attention over a packed row against Megatron's own masked attention.

The reference is Megatron's unmodified `DotProductAttention` given the block-diagonal causal
mask of the same segments (`workers.batching.block_causal_mask`): outputs and the gradients of
query, key and value must agree, with grouped-query attention (4 heads, 2 groups).
"""

import pytest
import torch

from tests.dist_utils import run_workers

SEGMENTS = [5, 9, 1, 3]
HEADS, GROUPS, DIM = 4, 2, 8


def _compare(rank, world_size, mask_type_name):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from mcore_r1.models.segment_attention import SegmentedDotProductAttention
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers.batching import block_causal_mask, segment_params

    initialize_parallel(ParallelDims(1))
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, attention_dropout=0.0)
    mask_type = AttnMaskType[mask_type_name]
    ours = SegmentedDotProductAttention(config, 1, mask_type, "self")
    megatron = DotProductAttention(config, 1, mask_type, "self")
    g = torch.Generator().manual_seed(0)
    total = sum(SEGMENTS)
    q0 = torch.randn(total, 1, HEADS, DIM, generator=g)
    k0, v0 = (torch.randn(total, 1, GROUPS, DIM, generator=g) for _ in range(2))
    grad_out = torch.randn(total, 1, HEADS * DIM, generator=g)
    mask = block_causal_mask(SEGMENTS)
    params = segment_params(SEGMENTS, torch.device("cpu"))

    def run(module, **kwargs):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = module(q, k, v, mask, **kwargs)
        out.backward(grad_out)
        return [out.detach(), q.grad, k.grad, v.grad]

    expected = run(megatron)
    got = run(ours, packed_seq_params=params)
    return [(a - b).abs().max().item() for a, b in zip(got, expected)]


def test_segments_equal_the_block_causal_mask_forward_and_backward():
    (diffs,) = run_workers(_compare, 1, "causal")
    assert max(diffs) <= 1e-6, f"|segments - mask| for out, dq, dk, dv: {diffs}"


def test_non_causal_masks_refuse_segments():
    with pytest.raises(RuntimeError, match="need plain causal attention, not arbitrary"):
        run_workers(_compare, 1, "arbitrary")


def test_segments_packing_carries_cu_seqlens_and_no_mask():
    from mcore_r1.workers.batching import Sample, pack

    mb = pack([Sample(torch.tensor([1, 2, 3]), 1), Sample(torch.tensor([4, 5]), 1)],
              fmt="segments", device=torch.device("cpu"))
    assert mb.attention_mask is None
    assert mb.packed_seq_params.qkv_format == "sbhd"
    assert mb.packed_seq_params.cu_seqlens_q.tolist() == [0, 3, 5]
    assert mb.packed_seq_params.max_seqlen_q == 5  # the row: what Megatron asks RoPE for
