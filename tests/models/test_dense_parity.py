"""Megatron dense LMs (Qwen2, Qwen3, Llama 3) give transformers' logits at TP=1, TP=2, PP=2
and TP=2 x PP=2, with weights loaded through the one HF <-> Megatron mapping."""

import functools

import pytest
import torch

from mcore_r1.models.tiny import ensure_tiny_model
from tests.dist_utils import run_workers

TEXT_MODELS = ("qwen2", "qwen3", "llama3")
TOL = 1e-4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: str(ensure_tiny_model(name, root)) for name in TEXT_MODELS}


def input_ids():
    return torch.randint(0, 1500, (2, 12), generator=torch.Generator().manual_seed(3))


@functools.lru_cache(maxsize=None)
def hf_logits(model_dir: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids()).logits


def _megatron_logits(rank, world_size, tp, pp, dirs):
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.models.forward import forward_logits
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel

    initialize_parallel(ParallelDims(world_size, tp=tp, pp=pp))
    out = {}
    for name, model_dir in dirs.items():
        model, hf = load_hf_model(model_dir, ModelLayout(tp=tp, pp=pp))
        out[name] = forward_logits(model.eval(), input_ids(), hf["vocab_size"])
    return out


@pytest.mark.parametrize("tp,pp,names", [
    (1, 1, TEXT_MODELS), (2, 1, TEXT_MODELS), (1, 2, TEXT_MODELS), (2, 2, ("qwen2",)),
], ids=["tp1", "tp2", "pp2", "tp2pp2"])
def test_logits_match_transformers(model_dirs, tp, pp, names):
    dirs = {n: model_dirs[n] for n in names}
    results = run_workers(_megatron_logits, tp * pp, tp, pp, dirs)
    last_stage = results[-1]  # Megatron's rank order puts the last PP stage last
    for name in names:
        expected = hf_logits(dirs[name])
        got = last_stage[name]
        assert got.shape == expected.shape, name
        diff = (got - expected).abs().max().item()
        assert diff <= TOL, f"{name} at TP={tp} PP={pp}: max |logit diff| = {diff:.2e}"
    if pp > 1:
        assert all(v is None for v in results[0].values())  # first stage has no logits
