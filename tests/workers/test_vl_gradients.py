"""VL training gradients: Megatron's Qwen2.5-VL (vision tower included) at TP=1 and TP=2 gives
transformers' gradients for the same log-prob objective on a sample with an image.

The log-prob tests pin the forward pass; this one pins the backward pass through the image
path (patch embedding, windowed vision blocks, merger, scatter into the language model), which
RL on images depends on. Megatron gradients are mapped to HF names through the same weight
mapping the converter uses (the transforms are linear, so they apply to gradients too).
"""

import functools

import pytest
import torch

from mcore_r1.models.tiny import ensure_tiny_model
from tests.dist_utils import run_workers

NAME = "qwen2_5_vl"
RESPONSE_TOKENS = 8
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_tiny_model(NAME, tmp_path_factory.mktemp("tiny")))


@functools.lru_cache(maxsize=None)
def processed(model_dir):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(3)
    content = [{"type": "image"}, {"type": "text", "text": "How many red circles are in the image?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    text += "<think> I count the shapes. </think> <answer>3</answer>"
    image = Image.fromarray(torch.randint(0, 256, (56, 84, 3), generator=g, dtype=torch.uint8).numpy())
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


def hf_gradients(model_dir) -> dict[str, torch.Tensor]:
    """transformers' gradients keyed by checkpoint tensor name (what the mapping speaks)."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager")
    inputs = processed(model_dir)
    ids = inputs["input_ids"][0]
    logp = torch.log_softmax(model(**inputs).logits[0, :-1].double(), -1)
    logp.gather(-1, ids[1:, None])[-RESPONSE_TOKENS:].sum().backward()
    # transformers 5 renames the checkpoint's keys on load (model.X -> model.language_model.X,
    # visual.X -> model.visual.X); a tied head has no checkpoint key of its own.
    by_name = {n: p for n, p in model.named_parameters() if p.grad is not None}
    grads = {}
    for name in load_file(str(Path(model_dir) / "model.safetensors")):
        candidates = [name, "model.language_model." + name.removeprefix("model."), "model." + name]
        owner = next(by_name[c] for c in candidates if c in by_name)
        grads[name] = owner.grad.detach().clone()
    return grads


def _megatron_gradients(rank, world_size, model_dir, inputs):
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from mcore_r1.models.builder import export_skip, layer_tables, load_hf_model, weight_rules
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.models.mapping import export_hf_weights
    from mcore_r1.models.mrope import mrope_position_ids
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers.batching import Sample, pad
    from mcore_r1.workers.logprobs import token_logprobs

    initialize_parallel(ParallelDims(world_size, tp=world_size))
    model, hf = load_hf_model(model_dir, ModelLayout(tp=world_size))
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    pos = mrope_position_ids(ids, grid, hf["image_token_id"], hf["vision_config"]["spatial_merge_size"])[:, 0]
    mb = pad([Sample(ids[0], ids.shape[1] - RESPONSE_TOKENS, pos, inputs["pixel_values"], grid)])
    logits = model(mb.input_ids, mb.position_ids, mb.attention_mask, **mb.vision)
    logp, _ = token_logprobs(logits, mb.labels, hf["text_config"]["vocab_size"])
    logp[0, -RESPONSE_TOKENS - 1:-1].sum().backward()
    norm = megatron_grad_norm(model)
    with torch.no_grad():  # export the gradients, not the weights, through the mapping
        for p in model.parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    group = mpu.get_tensor_model_parallel_group()

    def gather(shard):
        out = [torch.empty_like(shard) for _ in range(world_size)]
        dist.all_gather(out, shard.contiguous(), group=group)
        return out

    grads = dict(export_hf_weights(model, weight_rules(hf, world_size), gather, layer_tables(model),
                                   export_skip(hf)))
    return (grads, norm) if rank == 0 else None


def megatron_grad_norm(model) -> float:
    """The total gradient norm as Megatron's optimizer computes it for clipping: each grad
    counted once, TP-sharded ones on every rank, replicated ones on TP rank 0 only."""
    from megatron.core import parallel_state as mpu
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    grads = [p.grad for p in model.parameters() if p.grad is not None and param_is_not_shared(p)
             and param_is_not_tensor_parallel_duplicate(p)]
    return float(get_grad_norm_fp32(grads, grad_stats_parallel_group=mpu.get_model_parallel_group()))


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_vl_gradients_match_transformers(model_dir, tp):
    expected = hf_gradients(model_dir)
    got, norm = run_workers(_megatron_gradients, tp, model_dir, processed(model_dir))[0]
    # The norm clipping uses: a sharded weight that looks replicated is counted on one rank only.
    hf_norm = torch.stack([g.double().pow(2).sum() for g in expected.values()]).sum().sqrt().item()
    assert abs(norm - hf_norm) <= 1e-4 * hf_norm, (norm, hf_norm)
    vision = [n for n in got if "visual" in n]
    assert len(vision) > 10, "the vision tower's gradients are missing"
    worst = {}
    for name, grad in got.items():
        ref = expected[name]
        scale = ref.abs().max().item()
        assert scale > 0, f"{name}: transformers has a zero gradient"
        worst[name] = (grad - ref).abs().max().item() / scale
    bad = {n: f"{v:.2e}" for n, v in worst.items() if v > REL_TOL}
    print(f"TP={tp}: {len(got)} tensors, worst relative diff {max(worst.values()):.2e}")
    assert not bad, bad
