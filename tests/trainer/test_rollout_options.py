"""Driver-side rollout settings: fixed-length sampling (`rollout.ignore_eos`) and the sub-phase
timings (`timing/rollout/generate`, `timing/rollout/reward`) that stay out of the console line."""

from types import SimpleNamespace

from mcore_r1.config import compose, to_config
from mcore_r1.trainer.metrics import PhaseTimer, console_line
from mcore_r1.trainer.rollout import Rollout


def make_rollout(*overrides: str) -> Rollout:
    cfg = to_config(compose(["+experiment=tiny_text_grpo", *overrides]))
    return Rollout(workers=None, infos=[SimpleNamespace(num_replicas=1)], rewards=None, cfg=cfg)


def test_ignore_eos_applies_to_training_rollouts_only():
    assert not make_rollout().options().ignore_eos
    rollout = make_rollout("rollout.ignore_eos=true")
    params = rollout.options().to_vllm()
    assert params.ignore_eos and params.max_tokens == rollout.cfg.rollout.max_new_tokens
    assert not rollout.options(validation=True).ignore_eos
    assert not rollout.options(greedy=True).ignore_eos


def test_rollout_sub_phases_are_timed_under_the_active_phase():
    rollout = make_rollout()
    timer = PhaseTimer()
    rollout.begin_step(1, timer)
    with timer("rollout"):
        with rollout._phase("generate"):
            pass
    with timer("validate"):
        with rollout._phase("reward"):
            pass
    assert set(timer.metrics()) == {"timing/rollout", "timing/rollout/generate", "timing/validate",
                                    "timing/validate/reward"}
    line = console_line(1, 2, timer.metrics())
    assert "rollout 0.0" in line and "generate" not in line and "reward" not in line
