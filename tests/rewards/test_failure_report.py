"""A reward function that raises is reported with its traceback and the failing sample; the
sample gets the fallback score and the error is counted (training goes on)."""

import logging

from mcore_r1.rewards.pool import ScoringPool

REWARD = '''
def score(sample):
    if "boom" in sample["response"]:
        raise ZeroDivisionError("the grader divided by zero")
    return 1.0
'''


def test_raising_reward_reports_traceback_and_sample(tmp_path, caplog):
    path = tmp_path / "fragile_reward.py"
    path.write_text(REWARD)
    samples = [{"response": "fine", "ground_truth": "1", "prompt": "p", "response_length": 1},
               {"response": "this goes boom", "ground_truth": "42", "prompt": "q", "response_length": 3}]
    with caplog.at_level(logging.WARNING, logger="mcore_r1.rewards"):
        with ScoringPool(f"{path}:score", num_workers=1, timeout_s=30, fallback=-1.0) as pool:
            results = pool.score(samples)
            counters = dict(pool.counters)
    assert results == [{"overall": 1.0}, {"overall": -1.0}]
    assert counters.get("errors") == 1
    report = caplog.text
    assert "Traceback (most recent call last)" in report
    assert "fragile_reward.py\", line 4, in score" in report  # the user's failing line
    assert "ZeroDivisionError: the grader divided by zero" in report
    assert "failing sample #1: response='this goes boom' ground_truth='42'" in report
