"""The policy-loss step: packed vs padded micro-batching and any token budget give the same
loss and gradients, and both equal an independent transformers computation of the same loss.

The reference is written out here by hand (PPO clip, token-mean, minus an entropy bonus) on
the HF model, one sequence at a time; gradients are compared on RMSNorm weights, which are
stored identically in both layouts (final norm: the last layer; layer 0: the whole depth).
"""

import functools

import pytest
import torch

from mcore_r1.models.tiny import ensure_tiny_model
from tests.dist_utils import run_workers

LENGTHS = (9, 17, 5, 12, 20, 7, 3)
PROMPT_LENS = (4, 6, 2, 5, 8, 3, 1)
WIDTH = 14  # response matrices are wider than the longest response (12): junk columns
CLIP = 0.2
ENTROPY_COEFF = 0.01
VARIANTS = {  # name -> (packed, token budget)
    "packed32": (True, 32), "padded32": (False, 32), "packed64": (True, 64), "packed20": (True, 20),
}
NORMS = {"decoder.final_layernorm.weight": "model.norm.weight",
         "decoder.layers.0.input_layernorm.weight": "model.layers.0.input_layernorm.weight"}
TOL = 1e-5  # loss
GRAD_TOL = 1e-6  # measured <= ~1e-7; |grad| of the norms is ~1e-2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_tiny_model("qwen2", tmp_path_factory.mktemp("tiny")))


def batch():
    """Samples and rollout matrices; NaN in columns past each response (must never be read)."""
    g = torch.Generator().manual_seed(11)
    samples = [(torch.randint(0, 2000, (n,), generator=g), p) for n, p in zip(LENGTHS, PROMPT_LENS)]
    B = len(samples)
    old_shift = 0.3 * torch.randn(B, WIDTH, generator=g)  # old = logp + shift: some ratios clip
    adv = torch.randn(B, WIDTH, generator=g)
    mask = torch.ones(B, WIDTH)
    mask[1, 3] = 0  # a hole inside a response
    for i, (n, p) in enumerate(zip(LENGTHS, PROMPT_LENS)):
        for m in (old_shift, adv, mask):
            m[i, n - p:] = float("nan") if m is not mask else 0
    return samples, old_shift, adv, mask


@functools.lru_cache(maxsize=None)
def old_log_probs(model_dir):
    """Fixed 'old' log-probs: the model's own (from HF, detached) plus a shift."""
    logp, _ = hf_logp_entropy(_hf_model(model_dir), no_grad=True)
    samples, old_shift, _, _ = batch()
    old = torch.full_like(old_shift, float("nan"))
    for i, lp in enumerate(logp):
        old[i, :lp.numel()] = lp + old_shift[i, :lp.numel()]
    return old


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation="eager")


def hf_logp_entropy(model, no_grad=False):
    samples, *_ = batch()
    logps, ents = [], []
    with torch.set_grad_enabled(not no_grad):
        for ids, p in samples:
            logp_all = torch.log_softmax(model(ids[None]).logits[0, :-1], -1)
            logps.append(logp_all.gather(-1, ids[1:, None])[p - 1:, 0])
            ents.append(-(logp_all.exp() * logp_all).sum(-1)[p - 1:])
    return logps, ents


@functools.lru_cache(maxsize=None)
def hf_reference(model_dir, entropy_coeff=ENTROPY_COEFF):
    """Hand-written loss: token-mean over all valid tokens of PPO-clip minus c * entropy."""
    model = _hf_model(model_dir).train()
    _, _, adv, mask = batch()
    old = old_log_probs(model_dir)
    logps, ents = hf_logp_entropy(model)
    total, tokens = 0.0, mask.sum()
    for i, (lp, h) in enumerate(zip(logps, ents)):
        n = lp.numel()
        a, m = adv[i, :n], mask[i, :n].bool()
        ratio = torch.exp(lp - old[i, :n])
        per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(1 - CLIP, 1 + CLIP)) - entropy_coeff * h
        total = total + per_tok[m].sum()
    loss = total / tokens
    loss.backward()
    params = dict(model.named_parameters())
    return loss.item(), {mc: params[hf].grad.clone() for mc, hf in NORMS.items()}


def _megatron_step(rank, world_size, tp, pp, model_dir, old, variants):
    from megatron.core import parallel_state as mpu

    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers.batching import Sample
    from mcore_r1.workers.policy_step import LossConfig, policy_loss_step

    initialize_parallel(ParallelDims(world_size, tp=tp, pp=pp))
    model, hf = load_hf_model(model_dir, ModelLayout(tp=tp, pp=pp))
    spec, _, adv, mask = batch()
    samples = [Sample(ids, p) for ids, p in spec]
    cfg = LossConfig(policy_loss="ppo_clip", loss_kwargs=dict(clip_ratio_low=CLIP, clip_ratio_high=CLIP),
                     agg_mode="token-mean", entropy_coeff=ENTROPY_COEFF)
    out = {}
    for name in variants:
        packed, budget = VARIANTS[name]
        model.zero_grad(set_to_none=True)
        result = policy_loss_step(model, samples, hf["vocab_size"], budget, old_log_probs=old,
                                  advantages=adv, response_mask=mask, cfg=cfg, packed=packed)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        out[name] = (result, grads)
    out["pp_rank"] = mpu.get_pipeline_model_parallel_rank()
    return out


def _check(results, model_dir, label, variants):
    ref_loss, ref_grads = hf_reference(model_dir)
    last = results[-1]
    base_loss = last["packed32"][0].loss
    d_ref = abs(base_loss - ref_loss)
    print(f"{label}: loss {base_loss!r} (HF {ref_loss!r}, diff {d_ref:.2e}); micro-batches "
          + ", ".join(f"{k} {last[k][0].num_micro_batches}" for k in variants))
    assert d_ref <= TOL, f"{label}: loss {base_loss} vs transformers {ref_loss}"
    for name in variants:
        d = abs(last[name][0].loss - base_loss)
        assert d <= TOL, f"{label}: {name} loss differs from packed32 by {d:.2e}"
    for rank_out in results:
        grads = {n: rank_out[n][1] for n in variants}
        assert set(grads["packed32"]), "no gradients accumulated"
        for name in variants:
            assert grads[name].keys() == grads["packed32"].keys()
            d = max((grads[name][k] - grads["packed32"][k]).abs().max().item() for k in grads[name])
            print(f"  {label} pp_rank {rank_out['pp_rank']} {name}: max |grad - packed32| {d:.2e}")
            assert d <= GRAD_TOL, f"{label}: {name} gradients differ from packed32 by {d:.2e}"
        for mc, g_ref in ref_grads.items():
            # Layer names are stage-local: only the first stage's layer 0 is the global layer 0.
            if mc in grads["packed32"] and (rank_out["pp_rank"] == 0 or "layers." not in mc):
                d = (grads["packed32"][mc] - g_ref).abs().max().item()
                print(f"  {label} {mc}: max |grad - HF| {d:.2e} (|grad| max {g_ref.abs().max():.2e})")
                assert d <= GRAD_TOL, f"{label}: {mc} gradient vs transformers differs by {d:.2e}"
    seen = {mc for r in results for mc in NORMS if mc in r["packed32"][1]}
    assert seen == set(NORMS)


# All budgets at TP=1; the parallel layouts keep the cases that differ most (time budget).
@pytest.mark.parametrize("tp,pp,variants", [
    (1, 1, tuple(VARIANTS)), (2, 1, ("packed32", "padded32", "packed20")),
    (1, 2, ("packed32", "padded32", "packed20")),
], ids=["tp1", "tp2", "pp2"])
def test_packed_padded_and_budgets_agree_with_transformers(model_dir, tp, pp, variants):
    results = run_workers(_megatron_step, tp * pp, tp, pp, model_dir, old_log_probs(model_dir), variants)
    _check(results, model_dir, f"TP={tp} PP={pp}", variants)


def _dp_step(rank, world_size, model_dir, old):
    """DP=2: each rank takes every other sample; the default normaliser is summed over DP."""
    import torch.distributed as dist

    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers.batching import Sample
    from mcore_r1.workers.policy_step import LossConfig, policy_loss_step

    initialize_parallel(ParallelDims(world_size))
    model, hf = load_hf_model(model_dir, ModelLayout())
    spec, _, adv, mask = batch()
    mine = list(range(rank, len(spec), world_size))
    # No entropy term here: the other path of `token_logprobs` (no logits copy).
    cfg = LossConfig(loss_kwargs=dict(clip_ratio_low=CLIP, clip_ratio_high=CLIP), entropy_coeff=0.0)
    result = policy_loss_step(model, [Sample(*spec[i]) for i in mine], hf["vocab_size"], 32,
                              old_log_probs=old[mine], advantages=adv[mine],
                              response_mask=mask[mine], cfg=cfg)
    # No DDP wrapper here: sum the gradients over DP as the trainer's reduction would.
    loss = torch.tensor([result.loss])
    dist.all_reduce(loss)
    grads = {}
    for name in NORMS:
        g = dict(model.named_parameters())[name].grad.clone()
        dist.all_reduce(g)
        grads[name] = g
    return loss.item(), grads


def test_data_parallel_split_sums_to_the_whole_batch(model_dir):
    ref_loss, ref_grads = hf_reference(model_dir, entropy_coeff=0.0)
    for loss, grads in run_workers(_dp_step, 2, model_dir, old_log_probs(model_dir)):
        assert abs(loss - ref_loss) <= TOL, f"DP=2 summed loss {loss} vs transformers {ref_loss}"
        for name, g in grads.items():
            d = (g - ref_grads[name]).abs().max().item()
            print(f"DP=2 {name}: max |summed grad - HF| {d:.2e}")
            assert d <= GRAD_TOL


def test_bad_inputs_are_refused():
    from mcore_r1.workers.batching import Sample
    from mcore_r1.workers.policy_step import LossConfig, check_inputs, policy_loss_step

    samples = [Sample(torch.arange(6), 2), Sample(torch.arange(4), 1)]  # responses 4 and 3
    with pytest.raises(ValueError, match=r"advantages must be \[B=2, T\], got \(3, 4\)"):
        check_inputs(samples, advantages=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="old_log_probs has 3 columns but the longest response has 4"):
        check_inputs(samples, old_log_probs=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_log_probs"):
        policy_loss_step(None, samples, 2048, 16, old_log_probs=torch.zeros(2, 4),
                         advantages=torch.zeros(2, 4), response_mask=torch.ones(2, 4),
                         cfg=LossConfig(kl_coef=0.1))


@functools.lru_cache(maxsize=None)
def hf_on_policy_reference(model_dir):
    """The same loss with old := the forward's own detached log-probs (every ratio is 1), and
    those log-probs and entropies."""
    model = _hf_model(model_dir).train()
    _, _, adv, mask = batch()
    logps, ents = hf_logp_entropy(model)
    total = 0.0
    for i, (lp, h) in enumerate(zip(logps, ents)):
        n = lp.numel()
        a, m = adv[i, :n], mask[i, :n].bool()
        ratio = torch.exp(lp - lp.detach())
        per_tok = torch.maximum(-a * ratio, -a * ratio.clamp(1 - CLIP, 1 + CLIP)) - ENTROPY_COEFF * h
        total = total + per_tok[m].sum()
    loss = total / mask.sum()
    loss.backward()
    params = dict(model.named_parameters())
    return (loss.item(), {mc: params[hf].grad.clone() for mc, hf in NORMS.items()},
            [lp.detach() for lp in logps], [h.detach() for h in ents])


def _on_policy_step(rank, world_size, model_dir, entropy_coeff):
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers.batching import Sample
    from mcore_r1.workers.policy_step import LossConfig, policy_loss_step

    initialize_parallel(ParallelDims(world_size, tp=world_size))
    model, hf = load_hf_model(model_dir, ModelLayout(tp=world_size))
    spec, _, adv, mask = batch()
    cfg = LossConfig(policy_loss="ppo_clip", loss_kwargs=dict(clip_ratio_low=CLIP, clip_ratio_high=CLIP),
                     agg_mode="token-mean", entropy_coeff=entropy_coeff)
    result = policy_loss_step(model, [Sample(ids, p) for ids, p in spec], hf["vocab_size"], 32,
                              old_log_probs=None, advantages=adv, response_mask=mask, cfg=cfg)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if k in NORMS}
    return result, grads


@pytest.mark.parametrize("entropy_coeff", [ENTROPY_COEFF, 0.0], ids=["entropy_bonus", "no_bonus"])
def test_on_policy_step_uses_its_own_log_probs_and_returns_them(model_dir, entropy_coeff):
    ref_loss, ref_grads, ref_logp, ref_ent = hf_on_policy_reference(model_dir)
    for result, grads in run_workers(_on_policy_step, 2, model_dir, entropy_coeff):
        if entropy_coeff:  # the reference loss carries the entropy bonus
            assert abs(result.loss - ref_loss) <= TOL
            for mc, g_ref in ref_grads.items():
                assert (grads[mc] - g_ref).abs().max().item() <= GRAD_TOL, mc
        assert result.metrics["clipfrac"] == 0.0  # every ratio is exactly 1
        # what the separate old-policy pass would have given (the metric's entropy is computed
        # outside the graph when there is no entropy bonus: same numbers either way)
        assert len(result.log_probs) == len(ref_logp)
        for got, ref in zip(result.log_probs, ref_logp):
            assert (got - ref).abs().max().item() <= 1e-5
        for got, ref in zip(result.entropy, ref_ent):
            assert (got - ref).abs().max().item() <= 1e-5
