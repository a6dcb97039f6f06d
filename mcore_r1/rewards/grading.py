"""Answer extraction and equivalence, shared by the built-in rewards.

Equivalence is decided by math-verify with *both* sides parsed (each wrapped in ``\\boxed{}`` so
bare answers like ``0.5`` or ``x+1`` are extracted the same way as boxed ones). Deliberate
choices, each visible in the tests:

* parsing the gold answer too (rather than comparing a raw gold string, as RLCR does) makes
  ``2.0`` equal ``2`` and ``\\frac{1}{2}`` equal ``0.5``;
* math-verify accepts unreduced fractions (``\\frac{2}{4}`` equals ``\\frac{1}{2}``), unlike
  EasyR1's mathruler grader;
* a case- and whitespace-insensitive string match is tried first, so non-math answers
  ("neither", "B") work without sympy;
* any parser error or timeout means "not equal": a grader must never raise into the trainer.
"""

from __future__ import annotations

import re
from typing import Optional

_SPACES = re.compile(r"\s+")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (brace-matched), stripped; None if there is none."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{"):i - 1].strip()
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None


def last_tag(text: str, tag: str) -> Optional[str]:
    """Content of the last ``<tag>...</tag>`` (may span lines), stripped; None if absent."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def normalize_text(text: str) -> str:
    text = _SPACES.sub(" ", text.strip().lower())
    return text.rstrip(".").strip()


def answers_match(given: Optional[str], gold: str) -> bool:
    """True if `given` and `gold` are the same answer (see the module docstring)."""
    if given is None or not given.strip():
        return False
    if normalize_text(given) == normalize_text(gold):
        return True
    try:
        from math_verify import parse, verify

        gold_parsed = parse(f"\\boxed{{{gold}}}")
        given_parsed = parse(f"\\boxed{{{given}}}")
        return bool(gold_parsed and given_parsed and verify(gold_parsed, given_parsed))
    except Exception:  # math-verify raises on odd input and on timeouts: that is "wrong"
        return False
