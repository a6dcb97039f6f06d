"""Logit comparison between Megatron at some layout and transformers, on random inputs.

Used by `tools/convert_hf_mcore.py verify`. Text models get random token ids; VL models get a
two-sample chat batch with two random images of different sizes (so grids, padding and, for
Qwen2.5-VL, several attention windows are exercised). Only real (unpadded) positions count.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from mcore_r1.models.builder import VL_FAMILIES, family_of, load_hf_model
from mcore_r1.models.dense import ModelLayout
from mcore_r1.models.forward import causal_mask, forward_logits
from mcore_r1.models.registry import text_config


def random_inputs(model_dir: Path, hf: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = text_config(hf)
    if family_of(hf) not in VL_FAMILIES:
        ids = torch.randint(0, text["vocab_size"], (2, 16), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for w, h in ((140, 84), (224, 196))]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True) for q in ("What is in the image?", "Count the shapes.")]
    # everything the processor returns: transformers needs mm_token_type_ids for its positions
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def reference_logits(model_dir: Path, hf: dict, inputs: dict) -> torch.Tensor:
    import transformers

    auto = (transformers.AutoModelForImageTextToText if family_of(hf) in VL_FAMILIES
            else transformers.AutoModelForCausalLM)
    model = auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(**inputs).logits


def megatron_logits(model: torch.nn.Module, hf: dict, inputs: dict):
    from megatron.core import parallel_state as mpu

    ids, pad = inputs["input_ids"], inputs["attention_mask"]
    text = text_config(hf)
    positions, extra = None, {}
    if family_of(hf) in VL_FAMILIES:
        from mcore_r1.models.mrope import mrope_position_ids

        positions = mrope_position_ids(ids, inputs["image_grid_thw"], hf["image_token_id"],
                                       hf["vision_config"]["spatial_merge_size"], pad)
        if mpu.is_pipeline_first_stage():
            extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
    return forward_logits(model.eval(), ids, text["vocab_size"], positions,
                          causal_mask(ids.shape[1], padding_mask=pad), **extra)


def max_logit_diff(model_dir: str | Path, layout: ModelLayout, seed: int = 0) -> float:
    """Max |Megatron - transformers| over real positions; the same value on every rank."""
    from megatron.core import parallel_state as mpu

    model_dir = Path(model_dir)
    model, hf = load_hf_model(model_dir, layout, torch.float32)
    inputs = random_inputs(model_dir, hf, seed)
    logits = megatron_logits(model, hf, inputs)
    diff = torch.tensor([-1.0], dtype=torch.float64)
    if logits is not None and mpu.get_tensor_model_parallel_rank() == 0:
        expected = reference_logits(model_dir, hf, inputs)
        valid = inputs["attention_mask"].bool()
        diff[0] = (logits - expected)[valid].abs().max().item()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()
