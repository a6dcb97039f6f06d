"""Token-budget micro-batches, and the two ways to feed one to a Megatron model.

A rollout batch holds sequences of very different lengths (prompt + response). Padding them
to a common width wastes most of the compute on short answers, so the trainer *packs*: each
micro-batch is one row `[1, total]` holding several whole sequences back to back, and the
attention is restricted to each sequence's own block. Micro-batches are formed by a token
budget (`trainer.micro_batch_tokens`) rather than a sequence count, so their cost is even.

Three pieces, used in this order:

    plan = plan_micro_batches([s.length for s in samples], max_tokens)   # index lists
    mb   = pack([samples[i] for i in plan[k]])        # or pad(...), the reference path
    ...  model(mb.input_ids, mb.position_ids, mb.attention_mask,
               packed_seq_params=mb.packed_seq_params)
    per_seq = mb.split_response(token_values)         # per sequence, response positions only

`plan_micro_batches` is first-fit decreasing: deterministic (ties broken by index), each
sequence kept whole, and the index lists let results be scattered back in the original order.

Packing has three forms; `packing_format()` picks "thd" or "segments" at run time:

* "thd" (TransformerEngine on GPU): no mask; Megatron's `PackedSeqParams` with `cu_seqlens`
  tells TE's fused attention and fused RoPE where each sequence starts, and RoPE restarts at
  every sequence inside TE.
* "segments" (Megatron's local layers, the CPU path): `PackedSeqParams` in the "sbhd" format
  carry the same `cu_seqlens`, and `models.segment_attention` attends within each sequence;
  no `[T, T]` mask or score matrix exists.
* "mask": an explicit block-diagonal causal mask `[1, 1, T, T]` (True = may NOT attend,
  Megatron's convention) for Megatron's unmodified local attention; the reference the
  segments form is tested against.

In the last two, Megatron's local path computes RoPE for positions 0..T-1 of the row and
ignores `position_ids`; RoPE is relative, so that is equal in exact arithmetic, but float32
angles at large offsets lose ~1e-3 rad at 8k tokens. So `restarting_rope` (used around the
model call) makes the rotary module return angles for the per-sequence restarting
`position_ids` instead: packed then equals padded to rounding.

The padded form (`pad`) right-pads to `[B, T_max]` with a causal + padding mask; it is the
reference the packed path is tested against, and a fallback.

Targets: the log-prob of token t comes from the logits at t-1, so `labels[t] = input_ids[t+1]`
(junk at each sequence's last position, never read). A sample's response is
`input_ids[prompt_len:]`; `split_response` returns one value per response token, aligned with
the rollout's right-padded `B x T_response` matrices (the loss mask is the caller's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from mcore_r1.parallel import device as devmod

PACKING_FORMATS = ("thd", "segments", "mask")


@dataclass(frozen=True)
class Sample:
    """One sequence: prompt + response token ids `[L]`; the response is `input_ids[prompt_len:]`.

    `position_ids` (optional, `[L]` or `[3, L]` for M-RoPE) default to 0..L-1. VL samples
    carry their images as the processor returns them (`pixel_values` `[patches, C]`,
    `image_grid_thw` `[images, 3]`); a micro-batch concatenates them in its sample order,
    which is the order of the image tokens in the packed row or the padded rows.
    """

    input_ids: torch.Tensor
    prompt_len: int
    position_ids: Optional[torch.Tensor] = None
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    # [L] bool: where image features go. Needed when a response contains image-pad token ids
    # (random models emit them): vLLM embeds generated tokens as text, so only the prompt's
    # placeholders take features. None = every image-pad token (prompt-only sequences).
    image_mask: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.input_ids.dim() != 1:
            raise ValueError(f"Sample.input_ids must be 1-D, got shape {tuple(self.input_ids.shape)}")
        # Token 0 has no predecessor, so it can never be a response token with a log-prob.
        if not 1 <= self.prompt_len <= self.length:
            raise ValueError(f"prompt_len {self.prompt_len} must be in [1, {self.length}] (sequence length)")

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def response_len(self) -> int:
        return self.length - self.prompt_len


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `max_tokens` tokens each.

    First-fit decreasing: longest first (ties by index), each into the first micro-batch with
    room. Deterministic; indices inside a micro-batch are ascending.
    """
    if max_tokens < 1:
        raise ValueError(f"trainer.micro_batch_tokens must be >= 1, got {max_tokens}")
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"sequence {i} has {n} tokens, more than the micro-batch budget "
                             f"trainer.micro_batch_tokens={max_tokens}; raise the budget or "
                             "shorten prompts/responses")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, free in enumerate(room) if free >= lengths[i]), None)
        if k is None:
            bins.append([])
            room.append(max_tokens)
            k = len(bins) - 1
        bins[k].append(i)
        room[k] -= lengths[i]
    return [sorted(b) for b in bins]


def scatter_back(plan: list[list[int]], results: list[list], total: int) -> list:
    """Per-micro-batch results (in plan order) -> one list in the original sample order."""
    out: list = [None] * total
    for indices, values in zip(plan, results):
        if len(indices) != len(values):
            raise ValueError(f"micro-batch with {len(indices)} samples returned {len(values)} results")
        for i, v in zip(indices, values):
            out[i] = v
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"no result for sample(s) {missing[:10]} (plan does not cover them)")
    return out


PACKING_SETTINGS = ("auto", "segments", "mask")  # trainer.packing
_FORMAT_OVERRIDE: Optional[str] = None


def set_packing_format(name: str) -> None:
    """This process's packing (`trainer.packing`): "auto" for `packing_format()`'s choice, or
    "segments" / "mask" on Megatron's local layers. Set once by the worker at start-up."""
    global _FORMAT_OVERRIDE
    if name not in PACKING_SETTINGS:
        raise ValueError(f"trainer.packing={name!r}: expected auto, segments or mask")
    if name != "auto" and packing_format_auto() == "thd":
        raise ValueError(f"trainer.packing={name!r} needs Megatron's local layers; TransformerEngine "
                         "is in use here, which packs as 'thd' (use auto)")
    _FORMAT_OVERRIDE = None if name == "auto" else name


def packing_format_auto() -> str:
    """"thd" where TransformerEngine attention runs (CUDA + TE), else "segments" (local layers).

    Same predicate as `models.dense.layer_spec`, which picks the TE layers.
    """
    return "thd" if devmod.cuda_available() and devmod.transformer_engine_available() else "segments"


def packing_format() -> str:
    return _FORMAT_OVERRIDE or packing_format_auto()


@dataclass
class MicroBatch:
    """Model inputs for one micro-batch plus where each sample's tokens sit in them.

    `spans[j] = (row, start, sample)`: sample j occupies `input_ids[row, start:start+length]`.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    packed_seq_params: object = None
    spans: list = field(default_factory=list)
    packed: bool = False
    vision: dict = field(default_factory=dict)  # pixel_values, image_grid_thw (first PP stage)

    def model_kwargs(self) -> dict:
        kwargs = {}
        if self.packed_seq_params is not None:
            kwargs["packed_seq_params"] = self.packed_seq_params
        return kwargs

    def split_response(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-token values `[rows, T]` indexed like `labels` -> one `[response_len]` per sample.

        Value at position t belongs to target token t+1, so response tokens
        `prompt_len..L-1` read positions `prompt_len-1..L-2`.
        """
        return [values[row, start + s.prompt_len - 1:start + s.length - 1] for row, start, s in self.spans]

    def rope_context(self, model: torch.nn.Module):
        """Around the model call: RoPE at the per-sequence positions (see module docstring)."""
        thd = self.packed_seq_params is not None and self.packed_seq_params.qkv_format == "thd"
        if self.packed and not thd and self.position_ids.dim() == 2:
            return restarting_rope(model, self.position_ids[0])
        return contextlib.nullcontext()


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def _positions(sample: Sample) -> torch.Tensor:
    if sample.position_ids is not None:
        if sample.position_ids.shape[-1] != sample.length:
            raise ValueError(f"position_ids shape {tuple(sample.position_ids.shape)} does not "
                             f"end in the sample length {sample.length}")
        return sample.position_ids
    return torch.arange(sample.length)


def pack(samples: Sequence[Sample], fmt: Optional[str] = None, pad_to_multiple: int = 1,
         pad_id: int = 0, device: Optional[torch.device] = None) -> MicroBatch:
    """Concatenate `samples` into one row `[1, total]` (see the module docstring).

    `pad_to_multiple` appends a dummy segment so the row length divides it (TP sequence
    parallelism and CP need that on GPU); the dummy segment attends only to itself.
    """
    fmt = fmt or packing_format()
    if fmt not in PACKING_FORMATS:
        raise ValueError(f"unknown packing format {fmt!r}; known: {PACKING_FORMATS}")
    if not samples:
        raise ValueError("cannot pack an empty micro-batch")
    lengths = [s.length for s in samples]
    total = sum(lengths)
    pad = -total % pad_to_multiple
    ids = [s.input_ids.long() for s in samples]
    positions = [_positions(s) for s in samples]
    if pad:
        lengths = lengths + [pad]
        ids.append(torch.full((pad,), pad_id, dtype=torch.long))
        positions.append(_pad_positions(positions[0], pad))
    input_ids = torch.cat(ids).unsqueeze(0)
    position_ids = torch.cat(positions, dim=-1).unsqueeze(-2)  # [1, T] or [3, 1, T]
    starts = torch.tensor([0] + lengths).cumsum(0)
    spans = [(0, int(starts[j]), s) for j, s in enumerate(samples)]
    mask, params = None, None
    if fmt == "mask":
        mask = block_causal_mask(lengths)
    elif fmt == "segments":
        params = segment_params(lengths, device)
    else:
        params = thd_params(lengths, device)
    mb = MicroBatch(input_ids, position_ids, next_token_labels(input_ids), mask, params, spans,
                    packed=True, vision=_vision(samples))
    return to_device(_add_image_mask(mb), device)


def _pad_positions(like: torch.Tensor, n: int) -> torch.Tensor:
    pos = torch.arange(n)
    return pos.expand(like.shape[0], n) if like.dim() == 2 else pos


def block_causal_mask(lengths: Sequence[int]) -> torch.Tensor:
    """`[1, 1, T, T]` boolean, True = may NOT attend: causal within each segment, nothing across."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(segment.numel())
    allowed = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed)[None, None]


def cu_seqlens(lengths: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
    """Start offsets of the segments plus the total: `[0, l0, l0+l1, ..., T]` (int32)."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device or devmod.get_device())


def thd_params(lengths: Sequence[int], device: Optional[torch.device] = None):
    """Megatron `PackedSeqParams` (qkv_format "thd") for segments of `lengths`, for TE attention."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens(lengths, device)
    longest = int(max(lengths))
    # No CP padding inside segments here, so the padded offsets equal the real ones.
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def segment_params(lengths: Sequence[int], device: Optional[torch.device] = None):
    """`PackedSeqParams` in the "sbhd" format for `segment_attention`: Megatron keeps the row's
    `[T, 1, ...]` layout, and the max sequence lengths are the row's, which is what Megatron
    then asks RoPE for (`restarting_rope` indexes it per sequence)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens(lengths, device)
    total = int(sum(lengths))
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=total, max_seqlen_kv=total)


def pad(samples: Sequence[Sample], pad_id: int = 0, device: Optional[torch.device] = None) -> MicroBatch:
    """Right-pad `samples` to `[B, T_max]` with a causal + key-padding mask (reference path)."""
    from mcore_r1.models.forward import causal_mask

    if not samples:
        raise ValueError("cannot pad an empty micro-batch")
    width = max(s.length for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(samples), width, dtype=torch.bool)
    pos_list = []
    for b, s in enumerate(samples):
        input_ids[b, :s.length] = s.input_ids
        real[b, :s.length] = True
        pos = _positions(s)
        # Padding positions just continue counting; they are masked as keys and never read.
        tail = torch.arange(s.length, width).expand(*pos.shape[:-1], width - s.length)
        pos_list.append(torch.cat([pos, tail], dim=-1))
    position_ids = torch.stack(pos_list, dim=-2)  # [B, T] or [3, B, T]
    mask = causal_mask(width, padding_mask=real)
    spans = [(b, 0, s) for b, s in enumerate(samples)]
    mb = MicroBatch(input_ids, position_ids, next_token_labels(input_ids), mask, None, spans,
                    vision=_vision(samples))
    return to_device(_add_image_mask(mb), device)


def _vision(samples: Sequence[Sample]) -> dict:
    """The samples' images concatenated in sample order (empty for text-only micro-batches)."""
    with_images = [s for s in samples if s.pixel_values is not None]
    if not with_images:
        return {}
    return {"pixel_values": torch.cat([s.pixel_values for s in with_images]),
            "image_grid_thw": torch.cat([s.image_grid_thw for s in with_images])}


def _add_image_mask(mb: MicroBatch) -> MicroBatch:
    """Lay the samples' `image_mask`s out like `input_ids` (only when some sample has one)."""
    if "pixel_values" not in mb.vision or all(s.image_mask is None for _, _, s in mb.spans):
        return mb
    mask = torch.zeros_like(mb.input_ids, dtype=torch.bool)
    for row, start, s in mb.spans:
        if s.image_mask is not None:
            mask[row, start:start + s.length] = s.image_mask
    mb.vision["image_mask"] = mask
    return mb


def to_device(mb: MicroBatch, device: Optional[torch.device]) -> MicroBatch:
    if device is None:
        return mb
    mb.vision = {k: v.to(device) for k, v in mb.vision.items()}
    mb.input_ids, mb.position_ids, mb.labels = (t.to(device) for t in (mb.input_ids, mb.position_ids, mb.labels))
    if mb.attention_mask is not None:
        mb.attention_mask = mb.attention_mask.to(device)
    return mb


@contextlib.contextmanager
def restarting_rope(model: torch.nn.Module, positions: torch.Tensor):
    """Make the model's (non-multimodal) RoPE modules return angles for `positions` `[T]`.

    Megatron's `RotaryEmbedding.forward(T)` gives the angles of 0..T-1 as `[T, 1, 1, dim]`; we
    index the same table (Megatron's own formula, incl. interpolation) at the packed row's
    restarting positions. An instance attribute shadows the (lru-cached) class method and is
    removed on exit, even on error.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    modules = [m for m in model.modules() if type(m) is RotaryEmbedding]
    index = positions.long()
    top = int(index.max()) + 1

    def forward(rotary):
        def fn(max_seq_len, *args, **kwargs):
            if max_seq_len != index.numel():
                raise RuntimeError(f"RoPE asked for {max_seq_len} positions, packed row has {index.numel()}")
            return rotary.get_emb(top)[index.to(rotary.inv_freq.device)]
        return fn

    try:
        for m in modules:
            m.forward = forward(m)
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)
