"""Per-token log-probs from Megatron (packed and padded, TP=1/TP=2/PP=2) against transformers.

The reference is independent of the code under test: each sequence alone through the HF
model, `log_softmax` over the real vocabulary, gathered at the next token. A second model has
an odd vocabulary (2047) so at TP=2 the last shard holds a padding column that must not count.
"""

import functools

import pytest
import torch

from mcore_r1.models.tiny import ensure_tiny_model
from tests.dist_utils import run_workers

LENGTHS = (9, 17, 5, 12, 20, 7, 3)
PROMPT_LENS = (4, 6, 2, 5, 8, 3, 1)
BUDGET = 32  # -> several micro-batches, most holding more than one sequence
TOL_REF = 1e-5
TOL_PACKED_PADDED = 1e-6
ODD_VOCAB = 2047


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    qwen2 = ensure_tiny_model("qwen2", root)
    model = AutoModelForCausalLM.from_pretrained(qwen2, dtype=torch.float32)
    model.resize_token_embeddings(ODD_VOCAB)
    odd = root / "qwen2_odd_vocab"
    model.save_pretrained(odd)
    return {"qwen2": str(qwen2), "odd_vocab": str(odd)}


def samples_spec():
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(0, ODD_VOCAB, (n,), generator=g), p) for n, p in zip(LENGTHS, PROMPT_LENS)]


@functools.lru_cache(maxsize=None)
def hf_reference(model_dir: str):
    """Per sample: (log p of response tokens, entropy at their predicting positions)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for ids, p in samples_spec():
            logits = model(ids[None]).logits[0, :-1]  # position t predicts token t+1
            logp_all = torch.log_softmax(logits.double(), -1)
            logp = logp_all.gather(-1, ids[1:, None])[:, 0]
            ent = -(logp_all.exp() * logp_all).sum(-1)
            out.append((logp[p - 1:].float(), ent[p - 1:].float()))
    return out


def _megatron_logprobs(rank, world_size, tp, pp, dirs):
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers.batching import Sample
    from mcore_r1.workers.logprobs import compute_logprobs

    initialize_parallel(ParallelDims(world_size, tp=tp, pp=pp))
    samples = [Sample(ids, p) for ids, p in samples_spec()]
    out = {}
    for name, model_dir in dirs.items():
        model, hf = load_hf_model(model_dir, ModelLayout(tp=tp, pp=pp))
        for packed in (True, False):
            out[name, packed] = compute_logprobs(model, samples, hf["vocab_size"], BUDGET,
                                                 packed=packed, with_entropy=True)
    return out


def _rope_restarts(rank, world_size, model_dir):
    """Inside `restarting_rope` the model's RoPE angles are positions x inv_freq, by hand."""
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers.batching import restarting_rope

    initialize_parallel(ParallelDims(world_size))
    model, _ = load_hf_model(model_dir, ModelLayout())
    rotary = model.rotary_pos_emb
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2, 4000])
    freqs = torch.outer(positions.float(), rotary.inv_freq.float())
    expected = torch.cat([freqs, freqs], -1)[:, None, None, :]
    with restarting_rope(model, positions):
        inside = rotary(positions.numel())
    after = rotary(3)  # the module's own behaviour is back: positions 0, 1, 2
    return (inside - expected).abs().max().item(), (after - expected[:3]).abs().max().item()


def test_restarting_rope_uses_packed_positions(model_dirs):
    (diffs,) = run_workers(_rope_restarts, 1, model_dirs["qwen2"])
    assert diffs == (0.0, 0.0)


def _check(results, dirs, label):
    for name, model_dir in dirs.items():
        ref = hf_reference(model_dir)
        packed_logp, packed_ent = results[name, True]
        padded_logp, padded_ent = results[name, False]
        assert [t.shape[0] for t in packed_logp] == [n - p for n, p in zip(LENGTHS, PROMPT_LENS)]
        d_ref = max((a - r[0]).abs().max().item() for a, r in zip(packed_logp, ref))
        d_ent = max((a - r[1]).abs().max().item() for a, r in zip(packed_ent, ref))
        d_pp = max((a - b).abs().max().item() for a, b in zip(packed_logp, padded_logp))
        d_pe = max((a - b).abs().max().item() for a, b in zip(packed_ent, padded_ent))
        print(f"{label} {name}: |logp - HF| {d_ref:.2e}  |H - HF| {d_ent:.2e}  "
              f"|packed - padded| logp {d_pp:.2e} H {d_pe:.2e}")
        assert d_ref <= TOL_REF, f"{label} {name}: max |logp - HF| = {d_ref:.2e}"
        assert d_ent <= TOL_REF, f"{label} {name}: max |entropy - HF| = {d_ent:.2e}"
        assert d_pp <= TOL_PACKED_PADDED, f"{label} {name}: max |packed - padded| = {d_pp:.2e}"
        assert d_pe <= TOL_PACKED_PADDED, f"{label} {name}: entropy packed vs padded {d_pe:.2e}"


def test_tp1_matches_transformers(model_dirs):
    (result,) = run_workers(_megatron_logprobs, 1, 1, 1, {"qwen2": model_dirs["qwen2"]})
    _check(result, {"qwen2": model_dirs["qwen2"]}, "TP=1")


def test_tp2_matches_transformers_with_odd_vocab(model_dirs):
    results = run_workers(_megatron_logprobs, 2, 2, 1, model_dirs)
    for result in results:  # every TP rank gets the full answer
        _check(result, model_dirs, "TP=2")


def test_pp2_matches_transformers(model_dirs):
    dirs = {"qwen2": model_dirs["qwen2"]}
    first, last = run_workers(_megatron_logprobs, 2, 1, 2, dirs)
    assert all(v is None for v in first.values())
    _check(last, dirs, "PP=2")
