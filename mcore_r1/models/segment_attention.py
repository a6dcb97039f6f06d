"""Causal attention over packed sequences for Megatron's local (non-TransformerEngine) layers.

A packed micro-batch is one row holding several sequences back to back. TransformerEngine
attends within each sequence from `cu_seqlens` ("thd"); Megatron's local attention only knows
an explicit `[T, T]` mask, so it computes and stores scores for every pair of tokens in the
row, although only the blocks on the diagonal are used. At the CPU trainer's default budget of
4096 tokens that is 4096^2 scores per head and layer, kept for the backward pass: on a
0.36B-parameter model it took most of a 24 GiB machine and most of the step time.

`SegmentedDotProductAttention` replaces the local spec's core attention. Given a
`PackedSeqParams` with `qkv_format="sbhd"` and `cu_seqlens_q` (see
`mcore_r1.workers.batching.segment_params`), it runs causal `scaled_dot_product_attention`
on each sequence separately: memory and compute grow with the sum of the squared sequence
lengths instead of the square of their total. A segment may instead come with its own boolean
mask (`block_masks`, set by `mcore_r1.workers.prompt_sharing` for a prompt and its responses
packed together), which then replaces the causal one. Without those parameters (no packing,
or the vision tower's arbitrary masks) Megatron's own implementation runs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SegmentedDotProductAttention(DotProductAttention):
    """Megatron's `DotProductAttention`, plus per-sequence causal attention for packed rows."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "sbhd":
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias,
                                   packed_seq_params=packed_seq_params)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if (mask_type != AttnMaskType.causal or attention_bias is not None
                or self.config.apply_query_key_layer_scaling):
            raise ValueError(f"packed sequences ('segments') need plain causal attention, not "
                             f"{mask_type.name} (bias: {attention_bias is not None}, query-key "
                             f"layer scaling: {self.config.apply_query_key_layer_scaling}); "
                             f"pack with the 'mask' format instead")
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        segments = list(zip(bounds[:-1], bounds[1:]))
        # query [T, 1, heads, dim]; key/value [T, 1, groups, dim] (grouped-query attention).
        if query.size(1) != 1:
            raise ValueError(f"packed attention expects one row, got a batch of {query.size(1)}")
        if segments[-1][1] != query.size(0):
            raise ValueError(f"cu_seqlens end at {segments[-1][1]} but the packed row has "
                             f"{query.size(0)} tokens")
        # [1, heads, T, dim]: 4-D inputs let CPU SDPA use its flash kernel (3-D ones take the
        # math path: explicit score matrices and batched matmuls), and `enable_gqa` reads each
        # key/value group for its query heads without copying it per head
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        masks = getattr(packed_seq_params, "block_masks", None) or [None] * len(segments)
        out = torch.cat([
            F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                           attn_mask=mask, is_causal=mask is None,
                                           dropout_p=dropout, scale=self.softmax_scale,
                                           enable_gqa=True)
            for (a, b), mask in zip(segments, masks)], dim=2)             # [1, heads, T, dim]
        return out[0].transpose(0, 1).reshape(query.size(0), 1, self.hidden_size_per_partition)
