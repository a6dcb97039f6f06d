"""Rewards: built-in functions, custom-function loading, process-pool scoring, remote client.

`RewardManager` is the entry point: ``RewardManager(cfg.reward, max_response_length)``, then
``score(samples) -> [{"overall": ..., <part>: ...}]`` and ``metrics(results)``. See `builtin`
for the reward definitions and the sample/return contract custom functions follow.
"""

from mcore_r1.rewards.builtin import BUILTINS, overlong_penalty
from mcore_r1.rewards.loader import RewardFunctionError, load_reward_function, probe
from mcore_r1.rewards.manager import RewardManager
from mcore_r1.rewards.pool import ScoringPool
from mcore_r1.rewards.remote import RemoteRewardClient

__all__ = ["BUILTINS", "RemoteRewardClient", "RewardFunctionError", "RewardManager", "ScoringPool",
           "load_reward_function", "overlong_penalty", "probe"]
