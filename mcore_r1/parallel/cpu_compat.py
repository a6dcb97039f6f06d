"""Megatron-Core on machines without CUDA.

Megatron-Core assumes a GPU in a handful of places: it allocates with `device="cuda"` or
`device=torch.cuda.current_device()`, calls `.cuda()`, synchronises streams, and keeps its
dropout RNG streams as CUDA generator states. None of that is about the mathematics, so on a
CPU-only machine we redirect it instead of forking Megatron:

* a `TorchFunctionMode` rewrites every CUDA device argument (``"cuda"``, ``"cuda:1"``, an
  ordinal, a ``torch.device``) and ``Tensor.cuda()`` / ``Tensor.to("cuda")`` to the CPU;
* ``torch.cuda.current_device()`` yields the CPU device and stream/synchronise calls become
  no-ops;
* Megatron's CUDA RNG tracker is replaced by one with the same semantics (named, forkable
  streams seeded per TP rank) over CPU generator states;
* gradient clipping by total norm (which asserts `torch.cuda.FloatTensor` grads) gets a CPU
  twin with the same arithmetic, installed where Megatron's optimizer looks it up;
* Megatron's mixed-precision optimizer sorts parameters by their `Tensor.type()` name and
  refuses anything but `torch.cuda.*Tensor`; `cuda_type_names()` answers with those names for
  CPU tensors while it is built (only then: other code may rely on the true names).

The layer is process-global and idempotent, activated by `device.ensure_runtime()` only when
CUDA is absent; `deactivate()` undoes it (tests). Torch function modes are thread-local: code
running Megatron ops on a thread of its own must call `activate()` in that thread.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.Lock()
_state: dict[str, Any] = {"active": False, "mode": None, "saved": {}}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare ordinal means "CUDA device N" to torch's factories.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func in (torch.Tensor.pin_memory, torch.Tensor.record_stream):
            return args[0] if func is torch.Tensor.pin_memory else None
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.bfloat16: "torch.cuda.BFloat16Tensor",
                    torch.float16: "torch.cuda.HalfTensor"}


class CudaTypeNamesMode(TorchFunctionMode):
    """`t.type()` of a CPU float tensor gives the CUDA type name of its dtype."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.Tensor.type and len(args) == 1 and not kwargs
                and args[0].device.type == "cpu" and args[0].dtype in _CUDA_TYPE_NAMES):
            return _CUDA_TYPE_NAMES[args[0].dtype]
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_type_names():
    """Within the block, CPU tensors report CUDA type names (a no-op when the layer is off)."""
    if not _state["active"]:
        yield
        return
    with CudaTypeNamesMode():
        yield


class CpuRNGStatesTracker:
    """Megatron's RNG tracker contract (add / fork / get_states / set_states) on CPU generators.

    Each named stream holds a CPU generator state; `fork(name)` swaps it in for the duration of
    the block and saves where it got to, exactly as Megatron's CUDA tracker does, so dropout in
    tensor-parallel regions differs per TP rank and matches across data-parallel replicas.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already used by another tracked stream")
        if name in self.states_:
            raise ValueError(f"RNG stream {name!r} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG stream {name!r} was never added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _no_op(*args, **kwargs):
    return None


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    wait_stream = wait_event = record_event = record = synchronize = wait = _no_op

    def query(self):
        return True


def _cuda_patches() -> dict[str, Any]:
    return {
        "current_device": lambda: _CPU,
        "synchronize": _no_op,
        "current_stream": lambda *a, **k: _NullStream(),
        "default_stream": lambda *a, **k: _NullStream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "Stream": _NullStream,
        "Event": _NullStream,
        "empty_cache": _no_op,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "reset_peak_memory_stats": _no_op,
    }


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    _state["saved"]["rng_tracker"] = (
        mrandom._CUDA_RNG_STATE_TRACKER,
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED,
    )
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale grads in place by max_norm / (total_norm + 1e-6) when that is below 1 (Megatron's
    rule, including its epsilon), for float32/bfloat16 grads on any device."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for grad in grads:
            grad.mul_(clip_coeff)


_CLIP_MODULES = ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer")


def _install_clip() -> None:
    import importlib

    saved = {}
    for name in _CLIP_MODULES:
        module = importlib.import_module(name)
        saved[name] = module.clip_grad_by_total_norm_fp32
        module.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu
    _state["saved"]["clip"] = saved


def _restore_clip() -> None:
    import importlib

    for name, original in _state["saved"].get("clip", {}).items():
        importlib.import_module(name).clip_grad_by_total_norm_fp32 = original


def is_active() -> bool:
    return _state["active"]


def activate() -> None:
    """Switch the layer on in this process (idempotent)."""
    with _lock:
        if _state["active"]:
            return
        saved = {name: getattr(torch.cuda, name) for name in _cuda_patches()}
        _state["saved"] = {"cuda": saved}
        for name, replacement in _cuda_patches().items():
            setattr(torch.cuda, name, replacement)
        _install_rng_tracker()
        _install_clip()
        mode = CudaToCpuMode()
        mode.__enter__()
        _state["mode"] = mode
        _state["active"] = True


def deactivate() -> None:
    """Undo `activate()`: restore torch.cuda and Megatron's tracker, leave the mode."""
    with _lock:
        if not _state["active"]:
            return
        _state["mode"].__exit__(None, None, None)
        for name, original in _state["saved"]["cuda"].items():
            setattr(torch.cuda, name, original)
        from megatron.core.tensor_parallel import random as mrandom

        mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = _state[
            "saved"
        ]["rng_tracker"]
        _restore_clip()
        _state.update(active=False, mode=None, saved={})


@contextlib.contextmanager
def suspended():
    """Run a block without the device-rewriting mode (e.g. inside another engine)."""
    mode = _state["mode"]
    if not _state["active"] or mode is None:
        yield
        return
    mode.__exit__(None, None, None)
    try:
        yield
    finally:
        mode.__enter__()
