"""Built-in rewards on hand-worked cases (reference vectors of algorithms.md 6.10/6.11 where they apply)."""

from __future__ import annotations

import pytest

from mcore_r1.rewards.builtin import confidence_reward, math_reward, overlong_penalty, r1v_reward
from mcore_r1.rewards.grading import answers_match, last_boxed, last_tag


def s(response: str, truth: str) -> dict:
    return {"response": response, "ground_truth": truth, "prompt": "", "response_length": 1}


@pytest.mark.parametrize("given, gold, same", [
    ("\\frac{1}{2}", "0.5", True),       # fraction vs decimal
    ("0.5", "\\frac{1}{2}", True),
    ("2.0", "2", True),                  # both sides parsed (a raw gold string would say False)
    ("x+1", "1+x", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),  # math-verify accepts unreduced fractions
    ("$3$", "3", True),                  # latex delimiters
    ("3.", "3", True),                   # a full stop after the answer
    ("3 circles", "3", False),           # strict: no fishing a number out of words
    ("five", "5", False),
    ("4", "5", False),
    ("Neither", "neither", True),        # plain string answers, case-insensitive
    ("", "5", False),
    (None, "5", False),
])
def test_answers_match(given, gold, same):
    assert answers_match(given, gold) is same


def test_extraction():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{{a}{b}}") == "{a}{b}"
    assert last_boxed("\\boxed{2} and a broken \\boxed{3") == "2"
    assert last_boxed("no box") is None
    assert last_tag("<answer>1</answer> <answer>\n 2 \n</answer>", "answer") == "2"
    assert last_tag("<answer>1", "answer") is None


@pytest.mark.parametrize("response, fmt", [
    ("<think>ok</think> so \\boxed{2}", 1.0),
    ("  <think> ok </think>\n\\boxed{1/2}", 1.0),
    ("answer \\boxed{2}", 0.0),
    ("<think>a</think>", 0.0),
])
def test_math_format(response, fmt):
    assert math_reward(s(response, "2"))["format"] == fmt


@pytest.mark.parametrize("response, truth, fmt, acc, overall", [
    ("<think>x</think> so \\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0, 1.0),
    ("<think>x</think> \\boxed{2}", "2", 1.0, 1.0, 1.0),
    ("<think>x</think> \\boxed{2.0}", "2", 1.0, 1.0, 1.0),
    ("<think>x</think> \\boxed{x+1}", "1+x", 1.0, 1.0, 1.0),
    ("<think>x</think> The answer is \\boxed{3} apples.", "3", 1.0, 1.0, 1.0),
    ("The answer is \\boxed{3}.", "3", 0.0, 1.0, 0.9),   # right answer, wrong format
    ("<think>x</think> \\boxed{4}", "3", 1.0, 0.0, 0.1),
    ("no box", "2", 0.0, 0.0, 0.0),
    ("", "2", 0.0, 0.0, 0.0),                            # empty response (undecodable ids)
])
def test_math_reward(response, truth, fmt, acc, overall):
    out = math_reward(s(response, truth))
    assert out == pytest.approx({"overall": overall, "format": fmt, "accuracy": acc})


@pytest.mark.parametrize("response, truth, fmt, acc", [
    ("<think>a</think><answer>B</answer>", "B", 1.0, 1.0),
    ("<think>a</think> <answer>B</answer>\n", "B", 0.0, 1.0),  # trailing newline breaks format
    ("x<think>a</think><answer>B</answer>", "B", 0.0, 1.0),
    ("<think>count</think><answer>\n3\n</answer>", "3", 1.0, 1.0),  # multi-line answer
    ("<think>count</think><answer>4</answer>", "3", 1.0, 0.0),
    ("3", "3", 0.0, 1.0),          # no tags: the whole response is the answer
    ("", "3", 0.0, 0.0),
])
def test_r1v_reward(response, truth, fmt, acc):
    out = r1v_reward(s(response, truth))
    assert out == pytest.approx({"overall": 0.5 * acc + 0.5 * fmt, "format": fmt, "accuracy": acc})


TABC = "<think>a</think><answer>{a}</answer><analysis>b</analysis><confidence>{q}</confidence>"


@pytest.mark.parametrize("response, fmt", [
    (TABC.format(a=4, q=0.8), 1.0),
    ("reason</think> <answer>4</answer> <analysis>b</analysis> <confidence> 0.8 </confidence>\n", 1.0),
    (TABC.format(a=4, q=80), 0.0),           # outside [0, 1]
    (TABC.format(a=4, q=-0.1), 0.0),
    (TABC.format(a=4, q="high"), 0.0),       # not a number
    ("<think>a</think><answer>4</answer><confidence>0.8</confidence>", 0.0),  # no analysis
    ("<think>a</think><answer>4</answer><analysis>b</analysis>", 0.0),       # confidence missing
    (TABC.format(a=4, q=0.8) + " more text", 0.0),
])
def test_confidence_format(response, fmt):
    assert confidence_reward(s(response, "4"))["format"] == fmt


@pytest.mark.parametrize("answer, q, overall, brier", [
    (4, 0.9, 0.5 + 0.5 + 0.5 * 0.99, 0.99),   # right and confident
    (5, 0.9, 0.5 + 0.0 + 0.5 * 0.19, 0.19),   # wrong and confident: 1 - 0.81
    (4, 0.2, 0.5 + 0.5 + 0.5 * 0.36, 0.36),   # right but unsure: 1 - 0.64
    (5, 0.0, 0.5 + 0.0 + 0.5 * 1.0, 1.0),     # wrong and knows it
])
def test_confidence_reward(answer, q, overall, brier):
    out = confidence_reward(s(TABC.format(a=answer, q=q), "4"))
    assert out["overall"] == pytest.approx(overall)
    assert out["brier"] == pytest.approx(brier)
    assert out["confidence"] == q


def test_confidence_invalid_scores_zero_and_weights_are_configurable():
    assert confidence_reward(s(TABC.format(a=4, q=1.5), "4")) == \
        {"overall": 0.0, "format": 0.0, "accuracy": 0.0, "brier": 0.0, "confidence": 0.0}
    out = confidence_reward(s(TABC.format(a=4, q=0.5), "4"), format_weight=0.0,
                            accuracy_weight=1.0, brier_weight=2.0)
    assert out["overall"] == pytest.approx(1.0 + 2.0 * 0.75)


@pytest.mark.parametrize("length, expected", [
    (16000, 0.0), (16384, 0.0), (16385, -0.000244140625), (18432, -0.5), (20480, -1.0), (21000, -1.0),
])
def test_overlong_penalty_dapo_vectors(length, expected):
    assert overlong_penalty(length, 20480, 4096) == pytest.approx(expected, abs=1e-12)
