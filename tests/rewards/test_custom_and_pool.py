"""Custom reward functions (file and module specs, kwargs, start-up probe) and the scoring pool."""

from __future__ import annotations

import sys
import textwrap

import pytest

from mcore_r1.config.schema import RewardConfig
from mcore_r1.rewards import RewardFunctionError, RewardManager, ScoringPool, load_reward_function, probe

CUSTOM = textwrap.dedent("""
    import os, time

    def length_bonus(sample, scale=1.0):
        return {"overall": scale * len(sample["response"]), "chars": float(len(sample["response"]))}

    def plain(sample):
        return 0.25

    def misbehave(sample):
        text = sample["response"]
        if text == "sleep":
            time.sleep(10 ** 6)          # a grader that hangs forever
        if text == "raise":
            raise ZeroDivisionError("grader bug")
        if text == "crash":
            os._exit(3)                  # the process dies under us
        if text == "nan":
            return float("nan")
        return {"overall": 1.0, "ok": 1.0}

    def batch_lengths(samples, offset=0):
        return [len(s["response"]) + offset for s in samples]
    batch_lengths.REWARD_TYPE = "batch"
""")


def sample(response: str, truth: str = "1") -> dict:
    return {"response": response, "ground_truth": truth, "prompt": "Q", "response_length": len(response)}


@pytest.fixture()
def custom_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(CUSTOM)
    return path


def test_file_spec_with_kwargs_and_probe(custom_file):
    rf = load_reward_function(f"{custom_file}:length_bonus")
    assert not rf.batched
    parts = probe(rf, {"scale": 2.0})
    # Probe response '<think>1 + 1 = 2</think> <answer>2</answer> \boxed{2}', counted by parts:
    # <think> 7 + '1 + 1 = 2' 9 + </think> 8 + ' ' 1 + <answer> 8 + '2' 1 + </answer> 9 + ' ' 1
    # + \boxed{2} 9 = 53 characters.
    assert parts == {"overall": 106.0, "chars": 53.0}


def test_module_spec_and_float_result(custom_file, monkeypatch):
    monkeypatch.syspath_prepend(str(custom_file.parent))
    rf = load_reward_function("my_reward:plain")
    assert probe(rf, {}) == {"overall": 0.25}
    sys.modules.pop("my_reward", None)


def test_syntax_error_is_reported_at_start_up_with_file_and_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("def compute_score(sample):\n    return (1.0\n\ndef other():\n    pass\n")
    cfg = RewardConfig(function=str(bad), num_workers=1)
    with pytest.raises(RewardFunctionError, match=rf"{bad} line \d+: syntax error"):
        RewardManager(cfg)


@pytest.mark.parametrize("spec_suffix, kwargs, message", [
    (":nope", {}, r"no function 'nope' in .*my_reward.py \(callables there: batch_lengths, length_bonus"),
    (":length_bonus", {"scael": 2}, r"failed its start-up probe call .*unexpected keyword argument 'scael'"),
    (":misbehave", {}, None),  # fine on the probe sample
])
def test_probe_catches_wrong_names_and_kwargs(custom_file, spec_suffix, kwargs, message):
    rf_spec = f"{custom_file}{spec_suffix}"
    if message is None:
        assert probe(load_reward_function(rf_spec), kwargs) == {"overall": 1.0, "ok": 1.0}
        return
    with pytest.raises(RewardFunctionError, match=message):
        probe(load_reward_function(rf_spec), kwargs)


def test_unknown_specs(tmp_path):
    with pytest.raises(RewardFunctionError, match="does not exist"):
        load_reward_function(str(tmp_path / "missing.py:fn"))
    with pytest.raises(RewardFunctionError, match="not a built-in"):
        load_reward_function("no_such_reward")
    with pytest.raises(RewardFunctionError, match="cannot import"):
        load_reward_function("no_such_pkg.mod:fn")


@pytest.mark.timeout(180)
def test_pool_survives_hanging_raising_crashing_and_invalid_graders(custom_file):
    responses = ["ok", "sleep", "raise", "ok", "crash", "nan", "ok"]
    with ScoringPool(f"{custom_file}:misbehave", num_workers=2, timeout_s=2.0, fallback=-0.5) as pool:
        results = pool.score([sample(r) for r in responses])
        assert results == [{"overall": 1.0, "ok": 1.0}, {"overall": -0.5}, {"overall": -0.5},
                           {"overall": 1.0, "ok": 1.0}, {"overall": -0.5}, {"overall": -0.5},
                           {"overall": 1.0, "ok": 1.0}]
        assert dict(pool.counters) == {"timeouts": 1, "errors": 2, "crashes": 1}
        # The pool is still usable after killing and replacing workers.
        assert pool.score([sample("ok")] * 3) == [{"overall": 1.0, "ok": 1.0}] * 3


def test_pool_batch_function_keeps_order(custom_file):
    with ScoringPool(f"{custom_file}:batch_lengths", {"offset": 10}, num_workers=2, batched=True) as pool:
        out = pool.score([sample("a" * n) for n in range(5)])
    assert [r["overall"] for r in out] == [10.0, 11.0, 12.0, 13.0, 14.0]


def test_manager_with_builtin_overlong_and_metrics():
    cfg = RewardConfig(function="r1v", num_workers=0, overlong_buffer=4)
    manager = RewardManager(cfg, max_response_length=10)
    right = dict(sample("<think>a</think><answer>3</answer>", "3"), response_length=8)  # 2 over 6
    wrong = dict(sample("4", "3"), response_length=3)
    results = manager.score([right, wrong])
    assert results[0] == pytest.approx({"overall": 1.0 - 0.5, "format": 1.0, "accuracy": 1.0, "overlong": -0.5})
    assert results[1] == {"overall": 0.0, "format": 0.0, "accuracy": 0.0, "overlong": 0.0}
    assert manager.metrics(results) == pytest.approx(
        {"reward/overall": 0.25, "reward/format": 0.5, "reward/accuracy": 0.5, "reward/overlong": -0.25})


def test_manager_refuses_buffer_longer_than_limit():
    with pytest.raises(ValueError, match="overlong_buffer=64 must be smaller than the length limit 32"):
        RewardManager(RewardConfig(function="math", overlong_buffer=64), max_response_length=32)


@pytest.mark.parametrize("body, message", [
    ("os._exit(1)", "keep dying while starting"),                 # dies on import, in workers only
    ("raise ImportError('no grader here')", "could not load .*no grader here"),
])
@pytest.mark.timeout(120)
def test_pool_reports_workers_that_cannot_start(tmp_path, body, message):
    path = tmp_path / "fragile.py"
    path.write_text("import multiprocessing, os\n"
                    "if multiprocessing.current_process().name != 'MainProcess':\n"
                    f"    {body}\n"
                    "def compute_score(sample):\n    return 1.0\n")
    pool = ScoringPool(str(path), num_workers=1, timeout_s=5.0)
    try:
        with pytest.raises(RewardFunctionError, match=message):
            pool.score([sample("x")])
    finally:
        pool.close()
