"""The validator reports bad data/reward settings together, each with the offending value."""

from __future__ import annotations

import pytest

from mcore_r1.config import ConfigError, compose, to_config, validate


def test_bad_data_and_reward_settings_are_reported_together():
    cfg = to_config(compose(["data.format=openai", "data.synthetic=sudoku", "reward.timeout_s=0",
                             "reward.overlong_buffer=64", "rollout.max_new_tokens=32",
                             "reward.remote_url=localhost:9000"]))
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    text = str(info.value)
    for expected in ("data.format='openai' is unknown; known: easyr1, lmm_r1",
                     "data.synthetic='sudoku' is unknown",
                     "reward.timeout_s=0.0 must be > 0",
                     "reward.overlong_buffer=64 must be smaller than the length limit 32",
                     "reward.remote_url='localhost:9000' must start with http"):
        assert expected in text


def test_shipped_data_and_reward_groups_validate():
    # The default trainer's mini-batch (128) fits the default data's 16 prompts x 8 responses;
    # the other data groups sample 8 prompts per step.
    for overrides in (["data=synthetic_arithmetic", "reward=math", "trainer.mini_batch_size=64"],
                      ["reward=confidence"],
                      ["data=lmm_r1", "data.train_files=x.jsonl", "trainer.mini_batch_size=64"]):
        validate(to_config(compose(overrides)))
