"""Qwen2-VL / Qwen2.5-VL on Megatron match transformers: 3D position ids, and logits for a
batch with two images of different sizes, at TP=1, TP=2, PP=2 and TP=2 x PP=2."""

import functools

import pytest
import torch
from PIL import Image

from mcore_r1.models.mrope import mrope_position_ids
from mcore_r1.models.tiny import ensure_tiny_model
from tests.dist_utils import run_workers

VL_MODELS = ("qwen2_vl", "qwen2_5_vl")
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vl")
    return {name: str(ensure_tiny_model(name, root)) for name in VL_MODELS}


def images():
    g = torch.Generator().manual_seed(0)
    def img(w, h):
        return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
    return [img(140, 84), img(224, 196)]  # different grids; the second spans several windows


@functools.lru_cache(maxsize=None)
def hf_batch(model_dir: str):
    """Processor inputs for two chats (one image each, different text lengths) and HF logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    texts = []
    for question in ("How many red circles are in the image?", "What is 3 + 4?"):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
    inputs = processor(text=texts, images=images(), padding=True, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        hf_positions, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    keep = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    return keep, logits, hf_positions, model.config.image_token_id


@pytest.mark.parametrize("name", VL_MODELS)
def test_position_ids_match_transformers(model_dirs, name):
    inputs, _, expected, image_token_id = hf_batch(model_dirs[name])
    assert inputs["attention_mask"].sum() < inputs["attention_mask"].numel()  # padding present
    got = mrope_position_ids(inputs["input_ids"], inputs["image_grid_thw"], image_token_id, 2,
                             inputs["attention_mask"])
    assert torch.equal(got, expected)


def test_position_ids_reject_truncated_image():
    ids = torch.tensor([[1, 9, 12, 12, 12, 10, 3]])  # 3 image-pad tokens, grid needs 4
    with pytest.raises(ValueError, match="has 3 image-pad tokens but its grid"):
        mrope_position_ids(ids, torch.tensor([[1, 4, 4]]), 12, 2)


def _vl_logits(rank, world_size, tp, pp, dirs, batches):
    from megatron.core import parallel_state as mpu

    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.models.forward import causal_mask, forward_logits
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel

    initialize_parallel(ParallelDims(world_size, tp=tp, pp=pp))
    out = {}
    for name, model_dir in dirs.items():
        inputs, image_token_id = batches[name]
        model, hf = load_hf_model(model_dir, ModelLayout(tp=tp, pp=pp))
        ids, pad = inputs["input_ids"], inputs["attention_mask"]
        positions = mrope_position_ids(ids, inputs["image_grid_thw"], image_token_id, 2, pad)
        extra = {}
        if mpu.is_pipeline_first_stage():
            extra = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        out[name] = forward_logits(model.eval(), ids, hf["text_config"]["vocab_size"], positions,
                                   causal_mask(ids.shape[1], padding_mask=pad), **extra)
    return out


@pytest.mark.parametrize("tp,pp,names", [
    (1, 1, VL_MODELS), (2, 1, VL_MODELS), (1, 2, VL_MODELS), (2, 2, ("qwen2_5_vl",)),
], ids=["tp1", "tp2", "pp2", "tp2pp2"])
def test_vl_logits_match_transformers(model_dirs, tp, pp, names):
    batches, expected = {}, {}
    for name in names:
        inputs, logits, _, image_token_id = hf_batch(model_dirs[name])
        batches[name], expected[name] = (inputs, image_token_id), logits
    results = run_workers(_vl_logits, tp * pp, tp, pp, {n: model_dirs[n] for n in names}, batches)
    for name in names:
        valid = batches[name][0]["attention_mask"].bool()
        got = results[-1][name]
        diff = (got - expected[name])[valid].abs().max().item()
        assert diff <= TOL, f"{name} at TP={tp} PP={pp}: max |logit diff| = {diff:.2e}"
