"""Algorithm presets and the validator's algorithm rules (names checked against the registries)."""

import pytest

from mcore_r1.algos import (
    advantage_options, get_advantage_estimator, get_policy_loss, policy_loss_kwargs, seq_norm_len,
)
from mcore_r1.config import ConfigError, compose, experiment_names, to_config, validate

ALGOS = ["grpo", "dapo", "gspo", "cispo", "rloo", "remax", "reinforce_plus_plus", "ppo"]


def load(*overrides):
    return to_config(compose(list(overrides)))


def problems(*overrides):
    with pytest.raises(ConfigError) as err:
        validate(load("+experiment=tiny_text_grpo", *overrides))
    return "\n".join(err.value.problems)


def test_every_algorithm_has_a_preset_experiment():
    missing = [a for a in ALGOS if f"tiny_text_{a}" not in experiment_names()]
    assert not missing


@pytest.mark.parametrize("algo", ["ppo", "gspo", "cispo", "dapo"])
def test_presets_resolve_in_the_registries(algo):
    a = load(f"+experiment=tiny_text_{algo}").algorithm
    assert a.name == algo
    get_advantage_estimator(a.advantage_estimator)
    get_policy_loss(a.policy_loss)
    assert advantage_options(a).lam == a.lam
    assert policy_loss_kwargs(a)["clip_ratio_high"] == a.clip_ratio_high


def test_config_translation_rules():
    a = load("+experiment=tiny_text_grpo", "algorithm.clip_ratio_c=0").algorithm
    assert policy_loss_kwargs(a)["clip_ratio_c"] is None  # 0 = dual clip off
    assert seq_norm_len(a, 64) == 64.0
    a = load("+experiment=tiny_text_dr_grpo", "algorithm.seq_norm_len=100").algorithm
    assert seq_norm_len(a, 64) == 100.0 and a.loss_agg_mode == "seq-mean-token-sum-norm"


@pytest.mark.parametrize("override,message", [
    ("algorithm.advantage_estimator=grpo_passk", "advantage_estimator='grpo_passk' is unknown; known: gae, grpo"),
    ("algorithm.policy_loss=vanilla", "policy_loss='vanilla' is unknown; known: ppo_clip"),
    ("algorithm.loss_agg_mode=seq", "loss_agg_mode='seq' is unknown; known: token-mean"),
    ("algorithm.kl_estimator=k4", "kl_estimator='k4' is unknown; known: k1, kl"),
    ("algorithm.rollout_is=both", "rollout_is='both' is unknown; known: off, token, sequence"),
    ("algorithm.advantage_estimator=gae", "needs a critic: set algorithm.use_critic=true"),
    ("algorithm.use_critic=true", "never reads values"),
    ("rollout.n=1", "compares responses within a group but rollout.n=1"),
    ("algorithm.policy_loss=gspo", None),  # GRPO's clip 0.2 is allowed (< 1) ...
    ("algorithm.policy_loss=gspo_token algorithm.clip_ratio_high=1.5", "ranges are ~1e-4"),
    ("algorithm.kl_ctrl=adaptive", "kl_ctrl=adaptive steers KL in the reward"),
    ("algorithm.overlong_buffer_len=65 rollout.max_new_tokens=64",
     "overlong_buffer_len=65 must be in [0, rollout.max_new_tokens=64]"),
])
def test_validator_names_the_problem(override, message):
    overrides = override.split()
    if message is None:
        validate(load("+experiment=tiny_text_grpo", *overrides))
    else:
        assert message in problems(*overrides)


def test_group_of_one_allowed_when_configured():
    validate(load("+experiment=tiny_text_grpo", "rollout.n=1", "algorithm.singleton_groups=zero",
                  "trainer.mini_batch_size=8"))
