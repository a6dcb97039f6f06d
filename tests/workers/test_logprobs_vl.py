"""VL log-probs: images travel with their samples into packed and padded micro-batches.

Reference: each sample alone through transformers' Qwen2-VL with its processor outputs. The
batch mixes two image sizes and a text-only sample, and the budget packs images of different
samples into one row, so image features must land at the right sample's image tokens.
"""

import functools

import pytest
import torch

from mcore_r1.models.tiny import ensure_tiny_model
from tests.dist_utils import run_workers

NAME = "qwen2_vl"
IMAGE_SIZES = ((84, 56), None, (112, 140))  # (w, h) per sample; None = text only
QUESTIONS = ("What is in the image?", "Count to three.", "Count the shapes.")
RESPONSE_TOKENS = 6  # the last tokens of each sequence play the response
BUDGET = 56  # lengths 22, 12, 34: both image samples share one packed row
TOL_REF = 1e-5
TOL_PACKED_PADDED = 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_tiny_model(NAME, tmp_path_factory.mktemp("tiny")))


@functools.lru_cache(maxsize=None)
def processed(model_dir):
    """Processor outputs per sample (one sample per call: no padding)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(2)
    out = []
    for size, q in zip(IMAGE_SIZES, QUESTIONS):
        content = ([{"type": "image"}] if size else []) + [{"type": "text", "text": q}]
        text = processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)
        images = None
        if size:
            w, h = size
            images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g,
                                                    dtype=torch.uint8).numpy())]
        out.append(dict(processor(text=[text], images=images, return_tensors="pt")))
    return out


@functools.lru_cache(maxsize=None)
def hf_reference(model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    ref = []
    with torch.no_grad():
        for inputs in processed(model_dir):
            ids = inputs["input_ids"][0]
            logp = torch.log_softmax(model(**inputs).logits[0, :-1].double(), -1)
            ref.append(logp.gather(-1, ids[1:, None])[-RESPONSE_TOKENS:, 0].float())
    return ref


def _vl_logprobs(rank, world_size, tp, model_dir, inputs_list):
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.models.mrope import mrope_position_ids
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers.batching import Sample
    from mcore_r1.workers.logprobs import compute_logprobs

    initialize_parallel(ParallelDims(world_size, tp=tp))
    model, hf = load_hf_model(model_dir, ModelLayout(tp=tp))
    merge = hf["vision_config"]["spatial_merge_size"]
    samples = []
    for inputs in inputs_list:
        ids, grid = inputs["input_ids"], inputs.get("image_grid_thw")
        pos = mrope_position_ids(ids, grid, hf["image_token_id"], merge)[:, 0]
        samples.append(Sample(ids[0], ids.shape[1] - RESPONSE_TOKENS, pos,
                              inputs.get("pixel_values"), grid))
    vocab = (hf.get("text_config") or hf)["vocab_size"]
    return {packed: compute_logprobs(model, samples, vocab, BUDGET, packed=packed)
            for packed in (True, False)}


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_vl_logprobs_match_transformers(model_dir, tp):
    lengths = [p["input_ids"].shape[1] for p in processed(model_dir)]
    assert sum(lengths) > BUDGET > max(lengths)  # more than one micro-batch
    results = run_workers(_vl_logprobs, tp, tp, model_dir, processed(model_dir))
    ref = hf_reference(model_dir)
    for out in results:
        d_ref = max((a - r).abs().max().item() for a, r in zip(out[True], ref))
        d_pp = max((a - b).abs().max().item() for a, b in zip(out[True], out[False]))
        print(f"VL TP={tp}: lengths {lengths}; |logp - HF| {d_ref:.2e}; |packed - padded| {d_pp:.2e}")
        assert d_ref <= TOL_REF and d_pp <= TOL_PACKED_PADDED
