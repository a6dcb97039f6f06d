"""Refit of a vision-language model (tiny Qwen2.5-VL): the vision tower moves too.

Prompts carry one random image each, so vLLM's log-probs depend on the vision weights. At
training 1x1 / rollout TP 1: three consecutive refits agree with Megatron's recomputation; a
refit with the vision tower declared frozen moves fewer bytes and still agrees when only the
language model changed, and disagrees once the (unsent) vision weights change, which shows
the comparison really sees the vision tower. At 2x1/2 (rollout TP 2 over both processes) the
vision tower has no per-shard conversion, so `auto` takes the general path and says why.
"""

import pytest
import torch

from mcore_r1.models.tiny import ensure_tiny_model
from tests.dist_utils import run_workers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny")))


def _perturb_only(model, prefix, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _frozen_scenario(rank, world, model_dir):
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.rollout.check import run_check
    from mcore_r1.rollout.colocated import ColocatedEngine, SamplingOptions
    from mcore_r1.rollout.parity import logprob_parity, vl_prompts
    from mcore_r1.rollout.refit import RefitSource, refit

    rows = run_check(model_dir, 1, 1, 1, refits=3, num_prompts=3, report=lambda line: None)
    initialize_parallel(ParallelDims(1))
    model, hf = load_hf_model(model_dir, ModelLayout())
    engine = ColocatedEngine(model_dir, max_model_len=512)
    prompts, processed = vl_prompts(model_dir, 3, seed=5)
    options = SamplingOptions(n=2, max_tokens=12, seed=3)
    full = RefitSource.from_megatron(model, hf, tp=1)
    frozen = RefitSource.from_megatron(model, hf, tp=1, frozen=("vision_model.",))
    _perturb_only(model, "language_model.", 1)
    sent = {"all": refit(engine, full).bytes, "frozen": refit(engine, frozen).bytes}
    lang_only = logprob_parity(engine, model, hf, prompts, options, processed)
    _perturb_only(model, "vision_model.", 2)
    refit(engine, frozen)
    stale_vision = logprob_parity(engine, model, hf, prompts, options, processed)
    engine.close()
    return dict(rows=rows, sent=sent, lang_only=lang_only, stale_vision=stale_vision)


def test_vision_tower_refit_and_frozen_modules(model_dir):
    out = run_workers(_frozen_scenario, 1, model_dir, timeout_s=300)[0]
    for row in out["rows"]:
        assert row["ok"] and row["tokens"] > 0, row
    assert out["sent"]["frozen"] < out["sent"]["all"]
    assert out["lang_only"].ok(), out["lang_only"]
    assert out["stale_vision"].max_diff > 1e-2, out["stale_vision"]


def _tp2(rank, world, model_dir):
    from mcore_r1.rollout.check import run_check

    return run_check(model_dir, 2, 1, 2, refits=2, num_prompts=2, report=lambda line: None)


def test_vl_at_rollout_tp2(model_dir):
    for rank_rows in run_workers(_tp2, 2, model_dir, timeout_s=300):
        for row in rank_rows:
            assert row["path"] == "general" and row["ok"] and row["tokens"] > 0, row
