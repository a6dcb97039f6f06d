"""Finding a reward function from its spec, normalising its output, and the start-up probe.

Specs: a built-in name (``math``, ``r1v``, ``confidence``), ``path/to/file.py:fn`` (``:fn``
optional, default ``compute_score``), or ``pkg.module:fn``. A function is *per sample*
(``fn(sample, **kwargs) -> float | dict``) unless it, or its module, sets
``REWARD_TYPE = "batch"``; then it is ``fn(samples, **kwargs) -> list[float | dict]``.

`probe` calls the function once on a made-up sample before any worker or GPU starts, so a
syntax error, a wrong signature or a bad return value is reported at start-up with the file and
the reason, not hours into a run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mcore_r1.rewards.builtin import BUILTINS

PROBE_SAMPLE = {
    "prompt": "What is 1 + 1?",
    "response": "<think>1 + 1 = 2</think> <answer>2</answer> \\boxed{2}",
    "ground_truth": "2",
    "response_length": 16,
}


class RewardFunctionError(ValueError):
    """The configured reward function cannot be loaded or misbehaves on the probe sample."""


@dataclass
class RewardFunction:
    spec: str
    fn: Callable[..., Any]
    batched: bool


def load_reward_function(spec: str) -> RewardFunction:
    if spec in BUILTINS:
        return RewardFunction(spec, BUILTINS[spec], batched=False)
    target, _, name = spec.partition(":")
    if target.endswith(".py"):
        module = _load_file(Path(target).expanduser())
        name = name or "compute_score"
    elif name:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise RewardFunctionError(f"reward.function={spec!r}: cannot import {target!r} ({err})") from err
    else:
        raise RewardFunctionError(f"reward.function={spec!r} is not a built-in ({', '.join(BUILTINS)}), "
                                  "a path/to/file.py[:fn] or a pkg.module:fn")
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise RewardFunctionError(f"reward.function={spec!r}: no function {name!r} in {target} "
                                  f"(callables there: {', '.join(found) or 'none'})")
    reward_type = getattr(fn, "REWARD_TYPE", getattr(module, "REWARD_TYPE", "sequential"))
    if reward_type not in ("sequential", "batch"):
        raise RewardFunctionError(f"{spec}: REWARD_TYPE must be 'sequential' or 'batch', got {reward_type!r}")
    return RewardFunction(spec, fn, batched=reward_type == "batch")


def _load_file(path: Path):
    if not path.is_file():
        raise RewardFunctionError(f"reward function file {path} does not exist")
    module_name = "mcore_r1_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        sys.modules[module_name] = module  # lets dataclasses/pickling inside the file resolve
        spec.loader.exec_module(module)
    except SyntaxError as err:
        sys.modules.pop(module_name, None)
        raise RewardFunctionError(f"{path} line {err.lineno}: syntax error in the reward function "
                                  f"file: {err.msg}") from err
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise RewardFunctionError(f"{path}: importing the reward function file failed: "
                                  f"{type(err).__name__}: {err}") from err
    return module


def normalize(result: Any, where: str) -> dict[str, float]:
    """A float or a dict with `overall` -> dict of finite floats; anything else is an error."""
    if isinstance(result, dict):
        if "overall" not in result:
            raise RewardFunctionError(f"{where}: returned a dict without 'overall' (keys {sorted(result)})")
        items = result.items()
    else:
        items = [("overall", result)]
    out = {}
    for key, value in items:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardFunctionError(f"{where}: component {key!r} is {value!r}, not a finite number")
        out[str(key)] = float(value)
    return out


def call(rf: RewardFunction, samples: list[dict], kwargs: dict) -> list[dict[str, float]]:
    """Score `samples` with `rf` in this process (no timeout; workers wrap this)."""
    if rf.batched:
        results = rf.fn(samples, **kwargs)
        if not isinstance(results, (list, tuple)) or len(results) != len(samples):
            raise RewardFunctionError(f"{rf.spec}: a batch reward must return a list of "
                                      f"{len(samples)} results, got {type(results).__name__}")
    else:
        results = [rf.fn(sample, **kwargs) for sample in samples]
    return [normalize(r, rf.spec) for r in results]


def probe(rf: RewardFunction, kwargs: dict) -> dict[str, float]:
    """Call the function once on `PROBE_SAMPLE`; raise `RewardFunctionError` with the reason."""
    try:
        return call(rf, [dict(PROBE_SAMPLE)], kwargs)[0]
    except RewardFunctionError:
        raise
    except Exception as err:
        raise RewardFunctionError(f"reward function {rf.spec!r} failed its start-up probe call "
                                  f"with kwargs {kwargs}: {type(err).__name__}: {err}") from err
