"""Shared-prompt packing: the layout by hand, and log-probs, losses and gradients against the
plain packing and transformers (each sequence alone through the HF model)."""

import pytest
import torch

from mcore_r1.models.tiny import ensure_tiny_model
from mcore_r1.workers.batching import Sample
from mcore_r1.workers.prompt_sharing import group_tokens, pack_groups, plan_groups, prompt_groups
from tests.dist_utils import run_workers


def _spec():
    """(prompt, responses): prompt A twice (its groups must merge), a one-token prompt (empty
    shared prefix) and a prompt with a single response."""
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(0, 2000, (n,), generator=g)  # noqa: E731
    a, b, c = ids(6), ids(1), ids(9)
    return [(a, ids(4)), (b, ids(3)), (a, ids(7)), (c, ids(6)), (a, ids(2)), (b, ids(5))]


def samples():
    return [Sample(torch.cat([p, r]), p.numel()) for p, r in _spec()]


def test_groups_layout_and_targets():
    s = samples()
    assert prompt_groups(s) == [[0, 2, 4], [1, 5], [3]]
    mb = pack_groups(s, [[0, 2, 4], [3]], "segments")
    prompt_a, prompt_c = _spec()[0][0], _spec()[3][0]
    expected = torch.cat([prompt_a[:5], prompt_a[5:], _spec()[0][1], prompt_a[5:], _spec()[2][1],
                          prompt_a[5:], _spec()[4][1], prompt_c[:8], prompt_c[8:], _spec()[3][1]])
    assert torch.equal(mb.input_ids[0], expected)
    # positions continue the prompt in every segment
    assert mb.position_ids[0, :12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 5, 6]
    # the targets read for each response are exactly its tokens
    got = mb.split_response(mb.labels)
    for i, t in zip([0, 2, 4, 3], got):
        assert torch.equal(t, _spec()[i][1])
    assert mb.input_ids.shape[1] == group_tokens(s, [0, 2, 4]) + group_tokens(s, [3]) == 21 + 15
    # group A's mask: segment 2 (from column 10) sees the prefix and itself, not segment 1
    allowed = mb.packed_seq_params.block_masks[0]
    assert allowed[10, :5].all() and not allowed[10, 5:10].any() and allowed[10, 10]
    assert not allowed[10, 11:].any() and allowed[4, :5].all() and not allowed[4, 5:].any()
    # the mask format holds the same blocks, inverted, and nothing across groups
    mask = pack_groups(s, [[0, 2, 4], [3]], "mask").attention_mask[0, 0]
    assert torch.equal(~mask[:21, :21], allowed) and mask[21:, :21].all() and mask[:21, 21:].all()


def test_plan_splits_a_group_over_budget_and_keeps_every_sample():
    s = samples()
    planned = plan_groups(s, max_tokens=15)  # group A (21 tokens) must be cut
    flat = sorted(i for mb in planned for group in mb for i in group)
    assert flat == list(range(len(s)))
    assert all(sum(group_tokens(s, g) for g in mb) <= 15 for mb in planned)
    pieces_of_a = [g for mb in planned for g in mb if set(g) & {0, 2, 4}]
    assert len(pieces_of_a) > 1 and sorted(sum(pieces_of_a, [])) == [0, 2, 4]
    with pytest.raises(ValueError, match="sequence 3 has 15 tokens, more than the micro-batch budget"):
        plan_groups(s, max_tokens=14)  # prompt C + its response: 15 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_tiny_model("qwen2", tmp_path_factory.mktemp("tiny")))


def hf_logprobs(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        return [torch.log_softmax(model(s.input_ids[None]).logits[0, :-1], -1)
                .gather(-1, s.input_ids[1:, None])[s.prompt_len - 1:, 0] for s in samples()]


def _both_ways(rank, world_size, tp, pp, model_dir):
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers import prompt_sharing
    from mcore_r1.workers.logprobs import compute_logprobs, make_micro_batches
    from mcore_r1.workers.policy_step import LossConfig, policy_loss_step

    initialize_parallel(ParallelDims(world_size, tp=tp, pp=pp))
    model, hf = load_hf_model(model_dir, ModelLayout(tp=tp, pp=pp))
    s = samples()
    width = max(x.response_len for x in s)
    g = torch.Generator().manual_seed(4)
    adv = torch.randn(len(s), width, generator=g)
    mask = torch.zeros(len(s), width)
    for i, x in enumerate(s):
        mask[i, :x.response_len] = 1
    cfg = LossConfig(policy_loss="ppo_clip", agg_mode="token-mean", entropy_coeff=0.01)
    out = {}
    for setting in ("auto", "off"):
        prompt_sharing.set_prompt_sharing(setting)
        _, mbs = make_micro_batches(s, 24, fmt="segments")
        logp = compute_logprobs(model, s, hf["vocab_size"], 24, fmt="segments")
        model.zero_grad(set_to_none=True)
        step = policy_loss_step(model, s, hf["vocab_size"], 24, old_log_probs=None,
                                advantages=adv, response_mask=mask, cfg=cfg, fmt="segments")
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        # log-probs and the loss exist on the last pipeline stage only (None elsewhere)
        out[setting] = (sum(mb.input_ids.shape[1] for mb in mbs), logp,
                        step.loss if step is not None else None, grads)
    return out


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_shared_prompts_equal_plain_packing_and_transformers(model_dir, tp, pp):
    reference = hf_logprobs(model_dir)
    results = run_workers(_both_ways, tp * pp, tp, pp, model_dir)
    checked = 0
    for out in results:
        (tok_s, logp_s, loss_s, grads_s), (tok_p, logp_p, loss_p, grads_p) = out["auto"], out["off"]
        # A: 5 + (5 + 8 + 3), not 10 + 13 + 8; B: 0 + (4 + 6), as plain; C: 8 + 7, as plain
        assert (tok_s, tok_p) == (21 + 10 + 15, 31 + 10 + 15)
        assert grads_s.keys() == grads_p.keys() and grads_s
        worst = max((grads_s[k] - grads_p[k]).abs().max().item() for k in grads_s)
        assert worst <= 1e-6, worst
        if logp_s is None:  # an earlier pipeline stage
            assert loss_s is None and logp_p is None
            continue
        checked += 1
        assert len(logp_s) == len(logp_p) == len(reference)
        for shared, plain, ref in zip(logp_s, logp_p, reference):
            assert (shared - ref).abs().max().item() <= 1e-5
            assert (shared - plain).abs().max().item() <= 1e-5
        assert abs(loss_s - loss_p) <= 1e-6
    assert checked == (tp if pp == 1 else 1)


def _critic_values(rank, world_size, model_dir):
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers import prompt_sharing
    from mcore_r1.workers.critic import attach_value_head, compute_values

    initialize_parallel(ParallelDims(world_size))
    model, _ = load_hf_model(model_dir, ModelLayout())
    attach_value_head(model)
    with torch.no_grad():  # a head that is not zero, so the values depend on every position
        model.output_layer.weight.normal_(generator=torch.Generator().manual_seed(2))
    out = {}
    for setting in ("auto", "off"):
        prompt_sharing.set_prompt_sharing(setting)
        out[setting] = compute_values(model, samples(), 24)
    return out


def test_critic_values_are_read_at_the_same_states(model_dir):
    (out,) = run_workers(_critic_values, 1, model_dir)
    assert [v.numel() for v in out["auto"]] == [x.response_len for x in samples()]
    assert max(v.abs().max().item() for v in out["off"]) > 1e-3
    # float32 rounding relative to the values' scale (~1-8): a value near zero after
    # cancellation differs by more than 1e-5 of itself (seen: 1.3e-5 at 0.028 on an AVX2 CPU),
    # a value read at the wrong state by O(1)
    scale = max(v.abs().max().item() for v in out["off"])
    worst = max((s - p).abs().max().item() for s, p in zip(out["auto"], out["off"]))
    assert worst <= 1e-5 * scale, (worst, scale)
