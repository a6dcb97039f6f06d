"""Megatron's linear layers on the CPU GEMM: gradients against torch autograd in float64."""

import torch

from mcore_r1.models.cpu_linear import _CPULinear


def _inputs(seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 48, generator=gen)   # [sequence, batch, hidden] like Megatron
    w = torch.randn(40, 48, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    g = torch.randn(5, 3, 40, generator=gen)
    return x, w, b, g


def _grads(fn, x, w, b, g, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fn(*leaves)
    out.backward(g.to(dtype))
    return out, [t.grad if t is not None else None for t in leaves]


def test_forward_and_gradients_match_float64_autograd():
    x, w, b, g = _inputs()
    out, grads = _grads(lambda x, w, b: _CPULinear.apply(x, w, b, False, None), x, w, b, g,
                        torch.float32)
    ref_out, ref_grads = _grads(torch.nn.functional.linear, x, w, b, g, torch.float64)
    assert (out.double() - ref_out).abs().max() < 1e-4
    for name, got, ref in zip(("input", "weight", "bias"), grads, ref_grads):
        assert got.shape == ref.shape, name
        assert (got.double() - ref).abs().max() < 1e-4, name


def test_frozen_weight_gives_input_gradient_only():
    x, w, _, g = _inputs(1, bias=False)
    xin = x.clone().requires_grad_()
    out = _CPULinear.apply(xin, w, None, False, None)   # w.requires_grad is False
    out.backward(g)
    ref = g.double().reshape(-1, 40) @ w.double()
    assert (xin.grad.double().reshape(-1, 48) - ref).abs().max() < 1e-4
    assert w.grad is None


def _routed_layers(rank, world_size, model_dir):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from mcore_r1.models.builder import load_hf_model
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel

    initialize_parallel(ParallelDims(world_size, tp=world_size))
    model, _ = load_hf_model(model_dir, ModelLayout(tp=world_size))
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    return len(linears), sum(m._forward_impl.__name__ == "cpu_linear_impl" for m in linears)


def test_built_model_routes_its_linear_layers_through_the_cpu_gemm(tmp_path):
    """What makes the parity tests (against transformers) exercise this path."""
    from mcore_r1.models.tiny import ensure_tiny_model
    from tests.dist_utils import run_workers

    model_dir = str(ensure_tiny_model("qwen2", tmp_path))
    for total, routed in run_workers(_routed_layers, 2, model_dir):
        assert total > 0 and routed == total
