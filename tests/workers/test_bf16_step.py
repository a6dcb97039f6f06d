"""model.dtype=bfloat16 on CPU: the model is bf16 throughout, Megatron's mixed-precision
optimizer keeps float32 master weights, and one real forward/backward/step equals torch's
AdamW (with the same clipping) applied to float32 copies of the weights and rounded to bf16.

Before this worked, Megatron's bf16 optimizer refused CPU tensors by their type name, and
Megatron's norm layers stayed float32 inside a bf16 model.
"""

import pytest
import torch

from mcore_r1.models.tiny import ensure_tiny_model
from tests.dist_utils import run_workers

LR, CLIP = 1e-2, 0.5
SEQ = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_tiny_model("qwen2", tmp_path_factory.mktemp("tiny")))


def _bf16_step(rank, world_size, model_dir):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from mcore_r1.config import compose, to_config
    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel
    from mcore_r1.workers.hybrid import build_optimizer, guarded_step

    initialize_parallel(ParallelDims(world_size))
    cfg = to_config(compose(["+experiment=tiny_text_grpo", "model.dtype=bfloat16", f"trainer.lr={LR}",
                             f"trainer.clip_grad={CLIP}", "trainer.weight_decay=0.0",
                             "trainer.lr_warmup_steps=0", "trainer.lr_decay_style=constant"]))
    model, _ = load_hf_model(model_dir, ModelLayout(tp=1, pp=1), torch.bfloat16)
    ddp, optimizer, _ = build_optimizer(model, cfg, torch.bfloat16, total_updates=4)
    params = dict(model.named_parameters())
    before = {n: p.detach().float().clone() for n, p in params.items()}

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 2000, (2, SEQ), generator=gen)
    labels = torch.randint(0, 2000, (2, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(2, -1)
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    logits = ddp(tokens, positions, causal)
    vocab_parallel_cross_entropy(logits.float().contiguous(), labels).mean().backward()
    ddp.finish_grad_sync()
    grads = {n: p.main_grad.detach().clone() for n, p in params.items()}
    stepped, norm = guarded_step(optimizer, "actor", 0.0, "stop")
    masters = [m for inner in optimizer.chained_optimizers  # Megatron chains one per param group kind
               for group in inner.fp32_from_float16_groups for m in group]
    return {
        "param_dtypes": sorted({str(p.dtype) for p in params.values()}),
        "master_dtypes": sorted({str(m.dtype) for m in masters}), "masters": len(masters),
        "stepped": stepped, "norm": norm, "before": before, "grads": grads,
        "after": {n: p.detach().clone() for n, p in params.items()},
    }


def _reference_step(before: dict, grads: dict) -> tuple[float, dict]:
    """torch's clip_grad_norm_ and AdamW on float32 copies (Megatron's defaults: betas
    0.9/0.999, eps 1e-8)."""
    weights = {n: torch.nn.Parameter(t.clone()) for n, t in before.items()}
    for name, w in weights.items():
        w.grad = grads[name].clone()
    norm = torch.nn.utils.clip_grad_norm_(list(weights.values()), CLIP).item()
    torch.optim.AdamW(list(weights.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                      weight_decay=0.0).step()
    return norm, {n: w.detach() for n, w in weights.items()}


def test_bf16_step_keeps_float32_masters_and_matches_adamw(model_dir):
    got = run_workers(_bf16_step, 1, model_dir)[0]
    assert got["param_dtypes"] == ["torch.bfloat16"]  # norms included
    assert got["master_dtypes"] == ["torch.float32"] and got["masters"] == len(got["after"])
    assert got["stepped"]
    norm, expected = _reference_step(got["before"], got["grads"])
    assert norm > CLIP  # the clip really scales this step
    assert abs(got["norm"] - norm) <= 1e-5 * norm
    for name, want in expected.items():
        # Megatron copies the float32 master into the bf16 weight: round to nearest, like .to()
        assert torch.equal(got["after"][name], want.to(torch.bfloat16)), name
    moved = sum(not torch.equal(got["after"][n], got["before"][n].to(torch.bfloat16))
                for n in expected)
    assert moved == len(expected)  # every weight changed: the step is not vacuous
