"""The CPU GEMM behind every linear layer we run on CPU, Megatron's and vLLM's.

torch's CPU `matmul`/`F.linear` in float32 goes to MKL, and MKL runs its AVX2 kernels on AMD
CPUs, AVX-512 or not. oneDNN's matmul primitive, reached through
`torch.ops.mkldnn._linear_pointwise` with a plain (unpacked) weight, uses AVX-512 where the CPU
has it. Which is faster depends on the CPU, measured on two AMD EPYC machines of the CI type
(2 threads, float32, shapes of a 0.5B model's MLP):

- with AVX-512 (Zen 4): MKL 165-200 GFLOPS, oneDNN 400-460, at float32 precision (errors
  against a float64 reference of the same order as MKL's);
- AVX2 only (Zen 3): MKL 165-187 GFLOPS forward and backward, oneDNN 159 forward but 114-119
  for the backward products (`grad @ W`, `grad.T @ x`), a third slower.

`auto` keeps oneDNN wherever torch has it, on Zen 3 too, for now. MKL would be faster there:
the update of a 0.36B model took 40.7 s instead of 50.3. But switching kernels changes the
rounding, and the default job's 120-step run is sensitive to it. With MKL on Zen 3 its
validation accuracy ended 0.34 above its start, and its test requires 0.4; with oneDNN it passes
on both CPUs. Making that run robust comes before changing the default. `MCORE_R1_CPU_GEMM=torch`
(MKL, through Megatron's own layers) is the faster choice on AVX2-only CPUs;
`MCORE_R1_CPU_GEMM=onednn` makes oneDNN's absence an error. Transposed operands are passed as
strided views, so the backward pass needs no copies.

bfloat16 goes to oneDNN only where torch reports oneDNN bf16 support (AVX-512 BW/VL/DQ;
native bf16 arithmetic needs AVX512_BF16 or AMX besides): on the AVX2-only EPYC oneDNN refuses
to build a bf16 primitive at all, and torch's own kernel (emulated bf16, 20 GFLOPS there
against 154-173 in float32) is used instead.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

ENV = "MCORE_R1_CPU_GEMM"


def setting() -> str:
    """`MCORE_R1_CPU_GEMM`: auto (default), onednn or torch."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "onednn", "torch"):
        raise ValueError(f"{ENV}={choice!r}: expected auto, onednn or torch")
    return choice


@functools.lru_cache(maxsize=None)
def onednn_selected() -> bool:
    """Whether `linear` uses oneDNN in this process (decided once)."""
    choice = setting()
    if choice == "torch":
        return False
    problem = _onednn_problem()
    if problem is not None and choice == "onednn":
        raise RuntimeError(f"{ENV}=onednn but oneDNN's matmul is unusable here: {problem}")
    return problem is None


@functools.lru_cache(maxsize=None)
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes `linear` hands to oneDNN in this process (empty when it is not selected)."""
    if not onednn_selected():
        return ()
    return (torch.float32, torch.bfloat16) if bf16_supported() else (torch.float32,)


def bf16_supported() -> bool:
    """Whether oneDNN builds bfloat16 matmuls on this CPU (torch's own check)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def _onednn_problem() -> Optional[str]:
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "torch.ops.mkldnn._linear_pointwise is missing"
    gen = torch.Generator().manual_seed(0)
    # explicit device: the caller may be inside a `torch.device("meta")` block (shape planning)
    x, w, b = (torch.randn(*s, generator=gen, device="cpu") for s in ((5, 3, 16), (24, 16), (24,)))
    try:
        got = _onednn_linear(x, w.t().contiguous().t(), b)
    except RuntimeError as err:
        return f"probe failed: {err}"
    if not torch.allclose(got, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5):
        return "probe result differs from torch's"
    return None


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    # oneDNN's result for an N-d input is a view of a 2-d one; a view returned from an
    # autograd Function may not be modified in place later (Megatron's cross entropy does),
    # so fold and unfold like aten's matmul, whose `_unsafe_view` is not a view to autograd.
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias,
                                             "none", [], "")
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x @ weight.T + bias` like `F.linear` (no autograd through oneDNN: callers that need
    gradients compute them with `linear` too, see `models.cpu_linear`)."""
    if (x.device.type == "cpu" and x.numel() > 0 and x.dtype in onednn_dtypes()
            and weight.dtype == x.dtype and weight.dim() == 2
            and (bias is None or bias.dtype == x.dtype)):
        return _onednn_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)
