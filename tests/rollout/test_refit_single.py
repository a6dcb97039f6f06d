"""Refit at training TP=1 x PP=1 into an in-process vLLM engine (rollout TP=1), tiny Qwen2.5.

One spawned worker runs the whole scenario (vLLM keeps process-global state, and one engine
start is the expensive part); the tests below assert on what it measured:
  * three consecutive refits with different (seeded-noise) weights: after each, every vLLM
    tensor read back through its own kernel equals the Megatron source exactly, and differs
    from the previous refit's;
  * after each refit, vLLM's log-probs of its sampled tokens match Megatron's recomputation;
  * greedy generation after a refit equals transformers' greedy generation with the same
    weights (an independent implementation);
  * bad input (unknown name, wrong shape, Megatron parameter without a rule) stops the refit
    before vLLM is touched, and the engine still generates exactly as before.
All of it runs for both CPU weight layouts of the engine: "plain" (refit = vLLM's loaders
copying into live weights) and "packed" (vLLM's layerwise reload re-packing for oneDNN).
"""

import pytest
import torch

from mcore_r1.models.tiny import ensure_tiny_model
from tests.dist_utils import run_workers

MAX_TOL, MEAN_TOL = 1e-3, 1e-4


def perturb(model, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def hf_state(model, hf):
    from mcore_r1.models.builder import export_skip, layer_tables, weight_rules
    from mcore_r1.models.mapping import export_hf_weights

    return {n: t.clone() for n, t in export_hf_weights(
        model, weight_rules(hf, 1), layer_prefixes=layer_tables(model), skip=export_skip(hf))}


def transformers_greedy(model_dir, state, prompts, max_new):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = ref.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                               pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def _scenario(rank, world, model_dir, cpu_weights):
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.rollout.colocated import ColocatedEngine, SamplingOptions
    from mcore_r1.rollout.parity import logprob_parity, random_prompts
    from mcore_r1.rollout.refit import RefitError, RefitSource, checkpoint_shapes, refit
    from tests.rollout.vllm_readback import fuse_like_vllm, vllm_weights

    initialize_parallel(ParallelDims(1, tp=1, pp=1))
    model, hf = load_hf_model(model_dir, ModelLayout())
    engine = ColocatedEngine(model_dir, rollout_tp=1, max_model_len=256, cpu_weights=cpu_weights)
    src = RefitSource.from_megatron(model, hf, tp=1)
    prompts = random_prompts(3, 40, 1500, seed=0)  # long enough for prefix-cache hits
    out = {"parity": [], "exact": [], "changed": [], "metrics": [],
           "plain_weights": engine.plain_weights}
    previous = None
    for step in range(3):
        perturb(model, step)
        metrics = refit(engine, src, bucket_bytes=1 << 20)  # small buckets: several per refit
        out["metrics"].append(metrics)
        expected = fuse_like_vllm(hf_state(model, hf))
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]  # tied
        got = vllm_weights(engine.vllm_model())
        assert set(got) == set(expected), set(got) ^ set(expected)
        out["exact"].append([n for n in expected if not torch.equal(got[n], expected[n])])
        if previous is not None:
            out["changed"].append(all(not torch.equal(got[n], previous[n]) for n in got))
        previous = got
        parity = logprob_parity(engine, model, hf, prompts,
                                SamplingOptions(n=2, temperature=1.0, max_tokens=16, seed=step))
        out["parity"].append(parity)

    greedy = SamplingOptions(temperature=0.0, max_tokens=12)
    out["vllm_greedy"] = [r.samples[0].token_ids for r in engine.generate(prompts, greedy)]
    out["hf_greedy"] = transformers_greedy(model_dir, hf_state(model, hf), prompts, 12)

    # bad input: nothing reaches vLLM, generation is unchanged
    before = engine.generate(prompts, greedy)
    shapes = checkpoint_shapes(model_dir)
    wrong_shape = dict(shapes, **{"model.layers.1.mlp.down_proj.weight": (256, 256)})
    unknown = {k: v for k, v in shapes.items() if k != "model.layers.2.self_attn.o_proj.weight"}
    no_rule = RefitSource(model, [r for r in src.rules if "linear_fc2" not in r.mcore],
                          src.layer_prefixes, src.skip)
    errors = {}
    perturb(model, 99)
    for label, (source, expect) in {"shape": (src, wrong_shape), "unknown": (src, unknown),
                                    "no_rule": (no_rule, None)}.items():
        try:
            refit(engine, source, expected=expect)
            errors[label] = None
        except RefitError as err:
            errors[label] = str(err)
    after = engine.generate(prompts, greedy)
    out["errors"] = errors
    out["unchanged_after_errors"] = [
        (a.samples[0].token_ids, a.samples[0].logprobs) == (b.samples[0].token_ids, b.samples[0].logprobs)
        for a, b in zip(before, after)]
    out["checkpoint_bytes"] = sum(4 * torch.Size(s).numel() for s in shapes.values())
    engine.close()
    print("parity", out["parity"], "metrics", out["metrics"])
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_tiny_model("qwen2", tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module", params=["plain", "packed"])
def scenario(request, model_dir):
    out = run_workers(_scenario, 1, model_dir, request.param, timeout_s=240)[0]
    out["layout"] = request.param
    return out


def test_engine_was_built_with_the_requested_layout(scenario):
    assert scenario["plain_weights"] == (scenario["layout"] == "plain")


def test_logprobs_agree_after_each_refit(scenario):
    for step, parity in enumerate(scenario["parity"]):
        assert parity.tokens >= 60, parity
        assert parity.max_diff <= MAX_TOL and parity.mean_diff <= MEAN_TOL, (step, parity)


def test_three_refits_leave_exact_weights(scenario):
    for step, mismatched in enumerate(scenario["exact"]):
        assert mismatched == [], f"refit {step}: vLLM tensors differ from the source: {mismatched}"
    assert scenario["changed"] == [True, True]  # each refit really moved every tensor


def test_refit_reports_metrics(scenario):
    for m in scenario["metrics"]:
        assert m.path == "general" and m.seconds > 0 and m.buckets > 1
        assert m.bytes == scenario["checkpoint_bytes"]  # every HF tensor once, float32
        assert m.tensors == 2 + 4 * 12  # embed, norm; per layer 12 HF tensors (q/k/v biases)


def test_greedy_matches_transformers(scenario):
    assert scenario["vllm_greedy"] == scenario["hf_greedy"]


def test_bad_input_stops_before_touching_vllm(scenario):
    errors = scenario["errors"]
    assert "model.layers.1.mlp.down_proj.weight" in errors["shape"] and "(256, 256)" in errors["shape"]
    assert "model.layers.2.self_attn.o_proj.weight" in errors["unknown"]
    assert "linear_fc2" in errors["no_rule"]
    assert all("vLLM was not touched" in e for e in errors.values())
    assert all(scenario["unchanged_after_errors"])
