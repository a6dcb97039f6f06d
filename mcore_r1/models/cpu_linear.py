"""Megatron's tensor-parallel linear layers on CPU, with their GEMMs on `parallel.cpu_gemm`.

Megatron's local (non-TransformerEngine) linear layers compute with `torch.matmul`, which on
CPU is MKL's float32 GEMM; `cpu_gemm.linear` uses oneDNN where torch has it (about twice as
fast on AMD CPUs with AVX-512, same precision; see its docstring for AVX2 CPUs) and torch's
kernel otherwise. `use_cpu_gemm(model)` points each `ColumnParallelLinear`/`RowParallelLinear`
of a CPU model at `cpu_linear_impl`, an autograd function with Megatron's semantics for what CPU
training uses: forward, input gradient (all-reduced over TP when Megatron asks for it, issued
before the weight gradient so the two overlap), weight and bias gradients, frozen weights
(the reference model, a frozen vision tower) saving no activations. Whatever it does not
cover (sequence parallelism, deferred weight gradients, fused gradient accumulation: all
GPU-only today) goes to Megatron's own implementation, decided per call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mcore_r1.parallel import cpu_gemm


class _CPULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, allreduce_dgrad, tp_group):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        ctx.allreduce_dgrad, ctx.tp_group = allreduce_dgrad, tp_group
        return cpu_gemm.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_in = cpu_gemm.linear(grad_out, weight.t())
        handle = (dist.all_reduce(grad_in, group=ctx.tp_group, async_op=True)
                  if ctx.allreduce_dgrad else None)
        grad_weight = grad_bias = None
        if x is not None:
            g2d = grad_out.reshape(-1, grad_out.shape[-1])
            grad_weight = cpu_gemm.linear(g2d.t(), x.reshape(-1, x.shape[-1]).t())
            if ctx.has_bias:
                grad_bias = g2d.sum(dim=0)
        if handle is not None:
            handle.wait()
        return grad_in, grad_weight, grad_bias, None, None


def cpu_linear_impl(module, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                    sequence_parallel, tp_group=None, grad_output_buffer=None,
                    wgrad_deferral_limit=None, **kwargs):
    """Drop-in for Megatron's `_forward_impl` of a tensor-parallel linear layer."""
    if (sequence_parallel or gradient_accumulation_fusion or grad_output_buffer is not None
            or input.device.type != "cpu" or kwargs):
        return type(module)._forward_impl(
            module, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
            sequence_parallel, tp_group=tp_group, grad_output_buffer=grad_output_buffer,
            wgrad_deferral_limit=wgrad_deferral_limit, **kwargs)
    return _CPULinear.apply(input, weight, bias, allreduce_dgrad, tp_group)


def use_cpu_gemm(model: torch.nn.Module) -> int:
    """Route the model's tensor-parallel linear layers through `cpu_linear_impl` when the
    model is on CPU (unless MCORE_R1_CPU_GEMM=torch asks for Megatron's own path); returns
    how many layers were switched."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    linears = [m for m in model.modules()
               if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and _cpu_or_shared(m)]
    if not linears or cpu_gemm.setting() == "torch":
        return 0
    for module in linears:
        module._forward_impl = _bound(module)
    return len(linears)


def _cpu_or_shared(module) -> bool:
    """Its weight is on CPU, or it has none of its own (a tied output layer is handed the
    embedding's weight at call time; the call checks the device)."""
    weight = getattr(module, "weight", None)
    return weight is None or weight.device.type == "cpu"


def _bound(module):
    def forward_impl(*args, **kwargs):
        return cpu_linear_impl(module, *args, **kwargs)
    forward_impl.__name__ = "cpu_linear_impl"
    return forward_impl
