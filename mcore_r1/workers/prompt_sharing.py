"""Packing the n responses of a prompt around one copy of it ("shared-prompt" packing).

GRPO-style batches hold n responses per prompt. Packed plainly, every response carries its own
copy of the prompt, and the forward and backward passes compute the prompt's hidden states n
times over, identically. Here the responses of one prompt form a *group* laid out once:

    [p_0 ... p_{P-2}] [p_{P-1} a_0 ... a_{A-1}] [p_{P-1} b_0 ... b_{B-1}] ...
     shared prefix     segment of response a     segment of response b

Each segment starts with its own copy of the prompt's last token, so position j of a segment
still predicts the segment's token j+1 (the first predicts the response's first token) and
`MicroBatch.split_response` reads it unchanged through a per-segment `Sample` whose prompt is
that one token. A segment's tokens attend to the whole prefix and causally within the segment,
never to another response, and their positions continue the prompt's (P-1, P, ...): every
response sees exactly the sequence it would see alone. Log-probs, values and gradients are
those of the plain packing up to float rounding (the tests compare both with transformers).

Tokens per group drop from n(P + R) to P - 1 + n(R + 1): a third fewer for the benchmark's
8 x 4 x 64 batch with ~86-token prompts, and more with longer prompts or larger n.

Where it applies (`trainer.share_prompts=auto`): Megatron's local layers with the "segments"
attention (`models.segment_attention` runs one attention call per group with the group's
mask), text-only samples, and batches where some prompt has more than one response. Images
would need their features placed once per group, and TransformerEngine's fused attention
takes no such mask, so those batches keep the plain packing. The "mask" format builds the same
structure as one `[T, T]` mask, the reference the tests hold the segments path to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mcore_r1.workers.batching import (
    MicroBatch, Sample, next_token_labels, plan_micro_batches, segment_params, to_device,
)

SHARING_SETTINGS = ("auto", "off")  # trainer.share_prompts
_SETTING = "auto"


def set_prompt_sharing(name: str) -> None:
    """This process's `trainer.share_prompts`; set once by the worker at start-up."""
    global _SETTING
    if name not in SHARING_SETTINGS:
        raise ValueError(f"trainer.share_prompts={name!r}: expected one of {SHARING_SETTINGS}")
    _SETTING = name


def prompt_groups(samples: Sequence[Sample]) -> list[list[int]]:
    """Indices of samples with identical prompt ids, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.input_ids[:s.prompt_len].tolist()), []).append(i)
    return list(groups.values())


def applies(samples: Sequence[Sample], fmt: str) -> bool:
    """Whether `make_micro_batches` should pack these samples around shared prompts."""
    return (_SETTING == "auto" and fmt == "segments"
            and all(s.pixel_values is None and s.position_ids is None for s in samples)
            and any(len(g) > 1 for g in prompt_groups(samples)))


def group_tokens(samples: Sequence[Sample], indices: Sequence[int]) -> int:
    """Row tokens of one group: the shared prefix plus one segment per response."""
    prefix = samples[indices[0]].prompt_len - 1
    return prefix + sum(samples[i].response_len + 1 for i in indices)


def plan_groups(samples: Sequence[Sample], max_tokens: int) -> list[list[list[int]]]:
    """Micro-batches of groups within the token budget: a list (per micro-batch) of groups
    (lists of sample indices). A group too large for the budget is cut into several, each with
    its own copy of the prefix; a single response that does not fit fails as in
    `plan_micro_batches`."""
    units: list[list[int]] = []
    for group in prompt_groups(samples):
        current: list[int] = []
        for i in group:
            if current and group_tokens(samples, current + [i]) > max_tokens:
                units.append(current)
                current = []
            current.append(i)
        units.append(current)
    lengths = [group_tokens(samples, unit) for unit in units]
    for unit, n in zip(units, lengths):
        if n > max_tokens:  # one response alone: prefix + 1 + response = its plain length
            raise ValueError(f"sequence {unit[0]} has {n} tokens, more than the micro-batch "
                             f"budget trainer.micro_batch_tokens={max_tokens}; raise the budget "
                             "or shorten prompts/responses")
    return [[units[u] for u in bin_] for bin_ in plan_micro_batches(lengths, max_tokens)]


@dataclass
class GroupLayout:
    """One group's place in the packed row."""

    start: int
    prefix: int  # shared tokens (prompt without its last token)
    segments: list[int]  # lengths of the response segments, in order

    @property
    def length(self) -> int:
        return self.prefix + sum(self.segments)

    def allowed(self) -> torch.Tensor:
        """`[L, L]` boolean, True = may attend: the prefix causally, each segment the prefix
        plus itself causally."""
        owner = torch.cat([torch.full((self.prefix,), -1)] + [
            torch.full((n,), k) for k, n in enumerate(self.segments)])
        pos = torch.arange(self.length)
        causal = pos[None, :] <= pos[:, None]
        return causal & ((owner[None, :] == -1) | (owner[None, :] == owner[:, None]))


def pack_groups(samples: Sequence[Sample], groups: Sequence[Sequence[int]], fmt: str,
                pad_to_multiple: int = 1, pad_id: int = 0,
                device: Optional[torch.device] = None) -> MicroBatch:
    """One packed row holding `groups` of `samples` around shared prefixes (module docstring).

    `MicroBatch.spans` list one per-segment sample per response, in the order of `groups`
    flattened: that is the order `split_response` returns them in.
    """
    if fmt not in ("segments", "mask"):
        raise ValueError(f"shared-prompt packing needs the 'segments' or 'mask' format, not {fmt!r}")
    ids, positions, spans, layouts = [], [], [], []
    start = 0
    for group in groups:
        first = samples[group[0]]
        prefix = first.prompt_len - 1
        ids.append(first.input_ids[:prefix].long())
        positions.append(torch.arange(prefix))
        segments = []
        at = start + prefix
        for i in group:
            s = samples[i]
            segment = s.input_ids[prefix:].long()  # the prompt's last token, then the response
            ids.append(segment)
            positions.append(torch.arange(prefix, s.length))
            spans.append((0, at, Sample(segment, 1)))
            segments.append(segment.numel())
            at += segment.numel()
        layouts.append(GroupLayout(start, prefix, segments))
        start = at
    pad = -start % pad_to_multiple
    if pad:  # a dummy group attending only to itself, as `batching.pack` adds
        ids.append(torch.full((pad,), pad_id, dtype=torch.long))
        positions.append(torch.arange(pad))
        layouts.append(GroupLayout(start, pad, []))
    input_ids = torch.cat(ids).unsqueeze(0)
    position_ids = torch.cat(positions).unsqueeze(0)
    mask, params = None, None
    if fmt == "mask":
        mask = torch.ones(input_ids.shape[1], input_ids.shape[1], dtype=torch.bool)
        for layout in layouts:
            end = layout.start + layout.length
            mask[layout.start:end, layout.start:end] = ~layout.allowed()
        mask = mask[None, None]
    else:
        params = segment_params([layout.length for layout in layouts], device)
        params.block_masks = [layout.allowed().to(params.cu_seqlens_q.device) for layout in layouts]
    mb = MicroBatch(input_ids, position_ids, next_token_labels(input_ids), mask, params, spans,
                    packed=True)
    return to_device(mb, device)


def make_shared_micro_batches(samples: Sequence[Sample], max_tokens: int, fmt: str,
                              pad_to_multiple: int = 1, device=None,
                              ) -> tuple[list[list[int]], list[MicroBatch]]:
    """`make_micro_batches` for shared prompts: the plan lists sample indices in span order."""
    planned = plan_groups(samples, max_tokens)
    plan = [[i for group in groups for i in group] for groups in planned]
    return plan, [pack_groups(samples, groups, fmt, pad_to_multiple, device=device)
                  for groups in planned]
