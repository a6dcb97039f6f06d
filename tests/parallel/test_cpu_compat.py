"""The CPU compatibility layer: CUDA placements land on the CPU, RNG streams behave like
Megatron's CUDA tracker, and deactivation restores torch exactly."""

import pytest
import torch

from mcore_r1.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is for CPU-only hosts")


@pytest.fixture
def layer():
    was_active = cpu_compat.is_active()
    cpu_compat.activate()
    yield
    if not was_active:
        cpu_compat.deactivate()


def test_cuda_placements_land_on_cpu(layer):
    assert torch.cuda.current_device() == torch.device("cpu")
    for device in ("cuda", "cuda:1", 0, torch.device("cuda", 0)):
        assert torch.zeros(2, device=device).device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert x.to(device="cuda", dtype=torch.float64).dtype == torch.float64
    torch.cuda.synchronize()  # a no-op instead of "no CUDA GPUs are available"
    with torch.cuda.stream(torch.cuda.Stream()):
        assert torch.arange(3, device="cuda").sum().item() == 3


def test_deactivate_restores_torch():
    was_active = cpu_compat.is_active()
    cpu_compat.activate()
    cpu_compat.deactivate()
    try:
        assert not cpu_compat.is_active()
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")
    finally:
        if was_active:  # leave the process as other tests found it
            cpu_compat.activate()


def test_suspended_lets_cuda_requests_through_again(layer):
    with cpu_compat.suspended():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_rng_tracker_forks_like_megatron():
    tracker = cpu_compat.CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outside_before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(4)
    # the default stream is untouched by work inside the fork
    assert torch.equal(torch.get_rng_state(), outside_before)
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(4)
    # the forked stream continues where it stopped: same as one seeded generator drawing 8
    expected = torch.rand(8, generator=torch.Generator().manual_seed(123))
    assert torch.equal(torch.cat([first, second]), expected)
    with pytest.raises(ValueError):
        tracker.add("other", 123)  # a seed may be used once
    with pytest.raises(KeyError):
        with tracker.fork("missing"):
            pass


def test_megatron_uses_cpu_tracker_for_dropout_streams(layer):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
