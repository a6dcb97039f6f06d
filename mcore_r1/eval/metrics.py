"""Evaluation metrics: accuracy, Brier score, ECE, AUROC and unbiased pass@k.

Inputs are flat lists over all (prompt, sample) pairs: ``correct`` in {0, 1} and ``confidence``
in [0, 1]; pass@k takes per-prompt (n, c) counts. Pure Python, no numpy: these run on the
driver over a few thousand values.

Conventions (stated because implementations differ):

* ECE uses ``bins`` equal-width, left-closed bins ``[i/bins, (i+1)/bins)``, with 1.0 in the
  last bin; the bin index is ``min(floor(conf * bins), bins - 1)``, so a confidence exactly on
  an edge like 0.3 goes to bin 3 (numpy's ``digitize`` over ``linspace`` edges puts it in bin 2
  because ``linspace(0, 1, 11)[3]`` is 0.30000000000000004). ECE is
  ``sum_b (n_b / N) * |mean(conf_b) - mean(correct_b)|`` over non-empty bins.
* AUROC is the Mann-Whitney probability that a correct sample has higher confidence than a
  wrong one, ties counting one half; it is undefined (None) when all samples are correct or all
  are wrong.
* pass@k is the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` per
  prompt, computed as a product to stay exact for large n, averaged over prompts.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence


def _check(correct: Sequence[float], confidence: Optional[Sequence[float]] = None) -> None:
    if not correct:
        raise ValueError("no samples")
    if any(c not in (0, 1) for c in correct):
        raise ValueError("correct flags must be 0 or 1")
    if confidence is not None:
        if len(confidence) != len(correct):
            raise ValueError(f"{len(confidence)} confidences for {len(correct)} samples")
        if any(not 0.0 <= q <= 1.0 for q in confidence):
            raise ValueError("confidences must lie in [0, 1]")


def accuracy(correct: Sequence[float]) -> float:
    _check(correct)
    return sum(correct) / len(correct)


def brier_score(confidence: Sequence[float], correct: Sequence[float]) -> float:
    _check(correct, confidence)
    return sum((q - c) ** 2 for q, c in zip(confidence, correct)) / len(correct)


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[float],
                               bins: int = 10) -> float:
    _check(correct, confidence)
    members: dict[int, list[tuple[float, float]]] = {}
    for q, c in zip(confidence, correct):
        members.setdefault(min(int(math.floor(q * bins)), bins - 1), []).append((q, c))
    total = 0.0
    for pairs in members.values():
        mean_q = sum(q for q, _ in pairs) / len(pairs)
        mean_c = sum(c for _, c in pairs) / len(pairs)
        total += len(pairs) * abs(mean_q - mean_c)
    return total / len(correct)


def auroc(confidence: Sequence[float], correct: Sequence[float]) -> Optional[float]:
    """P(conf of a correct sample > conf of a wrong one) + 0.5 P(tie); None if one class only."""
    _check(correct, confidence)
    ranked = sorted(zip(confidence, correct))
    n_pos = sum(1 for _, c in ranked if c == 1)
    n_neg = len(ranked) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # Sum over positives of (#negatives below + 0.5 * #negatives tied), one pass over tie groups.
    wins, negatives_below, i = 0.0, 0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        pos = sum(1 for _, c in ranked[i:j] if c == 1)
        neg = (j - i) - pos
        wins += pos * (negatives_below + 0.5 * neg)
        negatives_below += neg
        i = j
    return wins / (n_pos * n_neg)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with `c` correct out of `n` samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over prompts given (n, c) per prompt."""
    if not counts:
        raise ValueError("no prompts")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def summarize(correct_by_prompt: Sequence[Sequence[float]], rewards: Sequence[float],
              confidence: Optional[Sequence[float]], ks: Sequence[int], bins: int = 10) -> dict:
    """The metrics.json body; calibration entries are None without confidences."""
    flat = [c for group in correct_by_prompt for c in group]
    counts = [(len(group), int(sum(group))) for group in correct_by_prompt]
    out = {
        "num_prompts": len(correct_by_prompt),
        "num_samples": len(flat),
        "accuracy": accuracy(flat),
        "mean_reward": sum(rewards) / len(rewards),
        "brier": None, "ece": None, "auroc": None, "mean_confidence": None,
    }
    if confidence is not None:
        out.update(brier=brier_score(confidence, flat), ece=expected_calibration_error(confidence, flat, bins),
                   auroc=auroc(confidence, flat), mean_confidence=sum(confidence) / len(confidence))
    out["pass@k"] = {str(k): mean_pass_at_k(counts, k) for k in ks}
    return out
