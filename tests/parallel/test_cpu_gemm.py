"""`cpu_gemm.linear` against a float64 reference, and its run-time selection."""

import os
import subprocess
import sys

import pytest
import torch

from mcore_r1.parallel import cpu_gemm


def _reference(x, w, b):
    out = x.double() @ w.double().t()
    return out if b is None else out + b.double()


KERNELS = {"selected": cpu_gemm.linear, "onednn": cpu_gemm._onednn_linear}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["2d", "3d", "bias", "strided_weight", "strided_input"])
def test_linear_matches_float64_reference(case, kernel):
    # oneDNN itself is checked on every machine, whichever kernel `auto` picks here
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 96, generator=gen) if case == "3d" else torch.randn(40, 96, generator=gen)
    w = torch.randn(72, 96, generator=gen)
    b = torch.randn(72, generator=gen) if case == "bias" else None
    if case == "strided_weight":   # the input gradient's operand: W.T as a view
        w = torch.randn(96, 72, generator=gen).t()
    if case == "strided_input":    # the weight gradient's operand: grad.T as a view
        x = torch.randn(96, 40, generator=gen).t()
    got = KERNELS[kernel](x, w, b)
    assert got.shape == (*x.shape[:-1], 72)
    # float32 rounding of 96-term dot products of unit normals: well under 1e-4
    assert (got.double() - _reference(x, w, b)).abs().max().item() < 1e-4
    assert got._base is None  # not a view: callers may modify it in place


def test_bfloat16_stays_bfloat16_and_close():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(16, 64, generator=gen), torch.randn(32, 64, generator=gen)
    got = cpu_gemm.linear(x.bfloat16(), w.bfloat16())
    assert got.dtype == torch.bfloat16
    ref = _reference(x.bfloat16().float(), w.bfloat16().float(), None)
    assert (got.double() - ref).abs().max().item() < 0.1  # bf16 output rounding of |y| <~ 30


def test_onednn_is_selected_where_torch_has_it():
    # the CI machine's torch build ships oneDNN; a build without it must fall back silently
    assert cpu_gemm.onednn_selected() == torch.backends.mkldnn.is_available()


def _selected_with(value: str) -> subprocess.CompletedProcess:
    code = "from mcore_r1.parallel import cpu_gemm; print(cpu_gemm.onednn_selected())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, cpu_gemm.ENV: value}, timeout=120)


def test_environment_forces_either_kernel_and_rejects_unknown_values():
    forced = _selected_with("torch")
    assert forced.returncode == 0 and forced.stdout.strip() == "False"
    if torch.backends.mkldnn.is_available():
        forced = _selected_with("onednn")
        assert forced.returncode == 0 and forced.stdout.strip() == "True", forced.stderr[-500:]
    bad = _selected_with("mkl")
    assert bad.returncode != 0 and "MCORE_R1_CPU_GEMM='mkl'" in bad.stderr


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def test_bfloat16_goes_to_onednn_only_where_the_cpu_has_avx512():
    # oneDNN builds bf16 primitives from AVX-512 BW/VL/DQ up; on AVX2-only CPUs it refuses them
    # ("could not create a primitive descriptor"), so `linear` must keep bf16 on torch there
    avx512 = {"avx512bw", "avx512vl", "avx512dq"} <= _cpu_flags()
    assert (torch.bfloat16 in cpu_gemm.onednn_dtypes()) == (avx512 and cpu_gemm.onednn_selected())
    assert torch.float32 in cpu_gemm.onednn_dtypes() or not cpu_gemm.onednn_selected()
