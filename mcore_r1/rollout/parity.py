"""Do the rollout engine and Megatron agree? Log-probs of sampled tokens, both ways.

vLLM samples responses and reports each sampled token's log-prob; Megatron then recomputes
the log-probs of exactly those sequences (prompt + response, one forward over any TP/PP
layout). After a correct refit the two agree to float32 round-off; a stale or wrongly laid
out as differences of order 1e-2 or more.

Vision-language models get chat prompts with one random image each (different sizes), so
the vision tower's weights are exercised too: vLLM receives the image, Megatron the same
pixels through the HF processor, and both must agree on the expanded prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mcore_r1.models.forward import causal_mask, forward_logits
from mcore_r1.models.registry import text_config
from mcore_r1.rollout.colocated import RolloutResult, SamplingOptions


@dataclass
class Parity:
    max_diff: float
    mean_diff: float
    tokens: int

    def ok(self, max_tol: float = 1e-3, mean_tol: float = 1e-4) -> bool:
        return self.tokens > 0 and self.max_diff <= max_tol and self.mean_diff <= mean_tol


def random_prompts(count: int, length: int, high: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (length,), generator=g).tolist() for _ in range(count)]


def vl_prompts(model_dir, count: int, seed: int = 0) -> tuple[list[dict], list[tuple]]:
    """Chat prompts with one random image each: vLLM requests, and per prompt the
    (input_ids, pixel_values, image_grid_thw) the HF processor makes of the same input."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    requests, processed = [], []
    for i in range(count):
        h, w = 56 + 28 * (i % 3), 84 + 28 * (i % 2)
        image = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g,
                                              dtype=torch.uint8).numpy())
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Image {i}?"}]}],
            add_generation_prompt=True)
        batch = processor(text=[text], images=[image], return_tensors="pt")
        requests.append({"prompt": text, "multi_modal_data": {"image": [image]}})
        processed.append((batch["input_ids"][0].tolist(), batch["pixel_values"], batch["image_grid_thw"]))
    return requests, processed


def megatron_logprobs(model: torch.nn.Module, hf: dict,
                      sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
                      images: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None,
                      ) -> Optional[list[torch.Tensor]]:
    """Log-prob of every response token given its prefix, one tensor per (prompt, response);
    None on pipeline stages other than the last. Collective over the model-parallel group.
    `images`: per sequence (pixel_values, image_grid_thw) for VL models."""
    from megatron.core import parallel_state as mpu

    from mcore_r1.models.builder import VL_FAMILIES, family_of

    vocab_size = text_config(hf)["vocab_size"]
    longest = max(len(p) + len(r) for p, r in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    pad = torch.zeros_like(ids)
    for i, (p, r) in enumerate(sequences):
        seq = list(p) + list(r)
        ids[i, :len(seq)] = torch.tensor(seq)
        pad[i, :len(seq)] = 1  # right padding: real positions keep their indices
    positions, extra = None, {}
    if family_of(hf) in VL_FAMILIES:
        from mcore_r1.models.mrope import mrope_position_ids

        grid = torch.cat([g for _, g in images]) if images else None
        positions = mrope_position_ids(ids, grid, hf["image_token_id"],
                                       hf["vision_config"]["spatial_merge_size"], pad)
        if images and mpu.is_pipeline_first_stage():
            extra = {"pixel_values": torch.cat([p for p, _ in images]), "image_grid_thw": grid}
    logits = forward_logits(model.eval(), ids, vocab_size, positions,
                            causal_mask(longest, padding_mask=pad), **extra)
    if logits is None:
        return None
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, (p, r) in enumerate(sequences):
        positions = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        out.append(logp[i, positions, torch.tensor(list(r), dtype=torch.long)])
    return out


def compare(results: Sequence[RolloutResult], recomputed: Optional[list[torch.Tensor]]) -> Parity:
    """Differences between vLLM's and Megatron's log-probs, reduced over all ranks (ranks
    without logits contribute nothing)."""
    total = torch.zeros(3, dtype=torch.float64)  # max, sum, count
    if recomputed is not None:
        engine = [torch.tensor(s.logprobs, dtype=torch.float64) for r in results for s in r.samples]
        for got, ref in zip(engine, recomputed):
            d = (got - ref.double()).abs()
            if d.numel():
                total[0] = max(total[0].item(), d.max().item())
                total[1] += d.sum()
                total[2] += d.numel()
    if dist.is_initialized() and dist.get_world_size() > 1:
        peak = total[:1].clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        sums = total[1:].clone()
        dist.all_reduce(sums)
        total = torch.cat([peak, sums])
    count = int(total[2].item())
    return Parity(total[0].item(), total[1].item() / max(count, 1), count)


def logprob_parity(engine, model: torch.nn.Module, hf: dict, prompts: Sequence,
                   options: SamplingOptions, processed: Optional[Sequence[tuple]] = None) -> Parity:
    """Sample with the engine, recompute with Megatron, compare (collective). `processed`:
    per prompt (input_ids, pixel_values, image_grid_thw) from `vl_prompts`."""
    results = engine.generate(prompts, options)
    sequences, images = [], []
    for i, r in enumerate(results):
        if processed is not None and list(r.prompt_token_ids) != processed[i][0]:
            raise ValueError(f"prompt {i}: vLLM and the HF processor expand the image into "
                             "different tokens; the comparison would be meaningless")
        for s in r.samples:
            sequences.append((r.prompt_token_ids, s.token_ids))
            if processed is not None:
                images.append(processed[i][1:])
    return compare(results, megatron_logprobs(model, hf, sequences, images or None))
