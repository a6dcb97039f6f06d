"""Every algorithm preset runs 2 RL steps of the tiny text experiment with the real stack
(Ray workers, Megatron actor/reference/critic, colocated vLLM, the reward pool) and writes
finite metrics for both steps."""

import math
from pathlib import Path

import pytest

from mcore_r1.config import compose, experiment_names, to_config, validate
from mcore_r1.trainer.metrics import read_metrics

# tiny_text_dapo_tp2 also runs training TP=2 and rollout TP=2 (vLLM's external launcher inside
# the Ray workers' torch.distributed world).
PRESETS = sorted(name for name in experiment_names() if name.startswith("tiny_text_"))
# Small enough for CI: 2 prompts x 4 responses of <= 12 tokens, one update per step.
SHORT = ["trainer.total_steps=2", "data.prompts_per_step=2", "rollout.n=4",
         "trainer.mini_batch_size=8", "trainer.val_every=0", "rollout.max_new_tokens=12",
         "reward.num_workers=1", "logger.backends=[jsonl]",
         f"reward.function={Path(__file__).with_name('varied_reward.py')}:score"]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    import ray

    ray.shutdown()


def test_every_preset_is_covered():
    assert len(PRESETS) >= 10, PRESETS


@pytest.mark.parametrize("experiment", PRESETS)
def test_preset_runs_two_steps(experiment, tmp_path):
    from mcore_r1.trainer.run import run_training

    overrides = [f"+experiment={experiment}", f"trainer.output_dir={tmp_path}", *SHORT]
    if "dapo" in experiment:  # the overlong ramp must fit inside the short responses
        overrides.append("algorithm.overlong_buffer_len=4")
    cfg = to_config(compose(overrides))
    validate(cfg)
    run_dir = run_training(cfg).run_dir
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] >= 1]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("actor/loss", "actor/grad_norm", "reward/overall", "timing/step", "refit/seconds",
                    "mismatch/mismatch_abs_max", "advantage/abs_mean"):
            assert math.isfinite(r[key]), (experiment, key, r[key])
        # The engine generates with the weights the trainer holds: refit + log-prob agreement.
        assert r["mismatch/mismatch_abs_max"] < 1e-3, (experiment, r["mismatch/mismatch_abs_max"])
    # The varied reward gives every estimator a signal, so the policy really gets a gradient.
    assert any(r["actor/grad_norm"] > 0 for r in records), experiment
    if cfg.algorithm.dynamic_sampling:
        assert all(r["dynamic_sampling/tries"] >= 1 for r in records)
    if cfg.algorithm.use_critic:
        assert all(math.isfinite(r["critic/loss"]) for r in records)
