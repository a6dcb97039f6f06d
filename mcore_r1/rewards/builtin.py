"""Built-in reward functions (`math`, `r1v`, `confidence`) and the overlong-length penalty.

Every reward function has the same shape as a user's custom one:
``fn(sample: dict, **kwargs) -> float | dict``, where `sample` holds ``response`` (decoded
text, special tokens removed), ``ground_truth``, ``prompt`` and ``response_length`` (tokens).
A dict result holds ``overall`` (the training signal) plus named parts, logged separately.
Empty responses (random-weight models often generate ids the tokenizer decodes to "") score 0.

* ``math``: format = the response starts with ``<think>...</think>`` and contains a
  ``\\boxed{}``; accuracy = the last boxed answer equals the reference;
  ``overall = (1 - format_weight) * accuracy + format_weight * format``.
* ``r1v``: format = exactly ``<think>...</think> <answer>...</answer>`` with nothing around;
  accuracy = the last ``<answer>`` content (the whole response if there is none) equals the
  reference; same mixing, format_weight 0.5.
* ``confidence`` (RLCR style): format = ``...</think> <answer>..</answer> <analysis>..</analysis>
  <confidence>q</confidence>`` at the end, with q a number in [0, 1]; accuracy counts only with a
  valid format; ``brier = 1 - (accuracy - q)^2`` (0 without a valid confidence);
  ``overall = format_weight*format + accuracy_weight*accuracy + brier_weight*brier``.
  The parsed q is returned as ``confidence`` (0 when invalid) for calibration metrics.
* `overlong_penalty`: DAPO's soft penalty, 0 up to ``max_length - buffer`` tokens, then linear
  down to -1 at ``max_length``, and -1 beyond. Applied on top of any reward by the manager.
"""

from __future__ import annotations

import math
import re
from typing import Callable

from mcore_r1.rewards.grading import answers_match, last_boxed, last_tag

_MATH_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_R1V_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_CONF_FORMAT = re.compile(
    r".*?</think>\s*<answer>.*?</answer>\s*<analysis>.*?</analysis>\s*<confidence>.*?</confidence>\s*",
    re.DOTALL)


def _mix(accuracy: float, fmt: float, format_weight: float) -> dict:
    return {"overall": (1 - format_weight) * accuracy + format_weight * fmt,
            "format": fmt, "accuracy": accuracy}


def math_reward(sample: dict, format_weight: float = 0.1) -> dict:
    response = sample["response"].strip()
    fmt = 1.0 if _MATH_FORMAT.fullmatch(response) else 0.0
    accuracy = 1.0 if answers_match(last_boxed(response), str(sample["ground_truth"])) else 0.0
    return _mix(accuracy, fmt, format_weight)


def r1v_reward(sample: dict, format_weight: float = 0.5) -> dict:
    response = sample["response"]
    fmt = 1.0 if _R1V_FORMAT.fullmatch(response) else 0.0
    given = last_tag(response, "answer")
    if given is None:
        given = response.strip()
    accuracy = 1.0 if answers_match(given, str(sample["ground_truth"]).strip()) else 0.0
    return _mix(accuracy, fmt, format_weight)


def parse_confidence(text: str | None) -> float | None:
    """q in [0, 1] from the confidence tag's content; None if missing, not a number or outside."""
    if text is None:
        return None
    try:
        q = float(text.strip())
    except ValueError:
        return None
    return q if math.isfinite(q) and 0.0 <= q <= 1.0 else None


def confidence_reward(sample: dict, format_weight: float = 0.5, accuracy_weight: float = 0.5,
                      brier_weight: float = 0.5) -> dict:
    response = sample["response"]
    q = parse_confidence(last_tag(response, "confidence"))
    fmt = 1.0 if _CONF_FORMAT.fullmatch(response) and q is not None else 0.0
    accuracy = 0.0
    if fmt:
        accuracy = 1.0 if answers_match(last_tag(response, "answer"), str(sample["ground_truth"])) else 0.0
    brier = 1.0 - (accuracy - q) ** 2 if fmt else 0.0
    overall = format_weight * fmt + accuracy_weight * accuracy + brier_weight * brier
    return {"overall": overall, "format": fmt, "accuracy": accuracy, "brier": brier,
            "confidence": q if fmt else 0.0}


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO soft overlong punishment in [-1, 0] for a response of `length` tokens."""
    if buffer <= 0 or max_length <= 0:
        raise ValueError(f"overlong penalty needs buffer > 0 and max_length > 0 (got {buffer}, {max_length})")
    expected = max_length - buffer
    if length <= expected:
        return 0.0
    if length > max_length:
        return -1.0
    return (expected - length) / buffer


BUILTINS: dict[str, Callable[..., dict]] = {
    "math": math_reward,
    "r1v": r1v_reward,
    "confidence": confidence_reward,
}
