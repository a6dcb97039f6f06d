"""What crosses from the driver to a training worker for one response: token ids and images.

The driver ships `Sequence`s (prompt ids as the data loader tokenised them, the response ids
vLLM sampled, the prompt's PIL images); each worker turns them into `batching.Sample`s itself.
For vision-language models that means running the image processor (same pixel limits as the
data loader and vLLM) and computing the 3-D M-RoPE position ids, so pixel tensors never travel
and the n responses of one prompt share one processed copy of its images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence as Seq

import torch

from mcore_r1.workers.batching import Sample


@dataclass
class Sequence:
    prompt_ids: list[int]
    response_ids: list[int]
    images: list = field(default_factory=list)  # PIL images of the prompt, in prompt order
    prompt_key: int = -1  # equal for the responses of one prompt (caches image processing)


class SampleBuilder:
    """`Sequence` -> `Sample` for one model (HF config dict) and its processor."""

    def __init__(self, hf: dict[str, Any], processor: Optional[Any] = None):
        self.hf = hf
        self.image_processor = getattr(processor, "image_processor", None)
        self.is_vl = "vision_config" in hf

    def _vision(self, images: list) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if not images:
            return None, None
        if self.image_processor is None:
            raise ValueError("a sequence has images but the model has no image processor")
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def build(self, sequences: Seq[Sequence]) -> list[Sample]:
        from mcore_r1.models.mrope import mrope_position_ids

        cache: dict[int, tuple] = {}
        samples = []
        for seq in sequences:
            if not seq.response_ids:
                raise ValueError("a sequence has an empty response: nothing to train on")
            ids = torch.tensor(list(seq.prompt_ids) + list(seq.response_ids), dtype=torch.long)
            if not self.is_vl:
                samples.append(Sample(ids, len(seq.prompt_ids)))
                continue
            key = seq.prompt_key if seq.prompt_key >= 0 else id(seq)
            if key not in cache:
                cache[key] = self._vision(seq.images)
            pixels, grid = cache[key]
            n_prompt = len(seq.prompt_ids)
            image_token = self.hf["image_token_id"]
            merge = self.hf["vision_config"]["spatial_merge_size"]
            # Positions from the prompt's placeholders only; the response continues as text on
            # all three axes (vLLM's decode positions), whatever ids it holds.
            prompt_pos = mrope_position_ids(ids[None, :n_prompt], grid, image_token, merge)[:, 0]
            tail = prompt_pos.max() + 1 + torch.arange(len(seq.response_ids))
            pos = torch.cat([prompt_pos, tail.expand(3, -1)], dim=1)
            image_mask = (ids == image_token) & (torch.arange(len(ids)) < n_prompt)
            samples.append(Sample(ids, n_prompt, pos, pixels, grid, image_mask))
        return samples
