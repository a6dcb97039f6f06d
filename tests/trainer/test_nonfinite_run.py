"""`trainer.nonfinite` end to end: a learning rate of 1e35 makes the weights blow up after the
first update, so from step 2 on the model's log-probs are NaN. `stop` ends the run naming the
tensor; `skip` drops those steps, keeps the last finite weights and finishes.

These runs are on-policy (one mini-batch per step), so by default the old log-probs come from
the update itself; `trainer.old_logprobs=recompute` checks them in a separate pass first."""

import math
import subprocess
import sys
from pathlib import Path

import torch

from mcore_r1.trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["+experiment=tiny_text_grpo", "trainer.total_steps=3", "data.prompts_per_step=2",
         "rollout.n=4", "trainer.mini_batch_size=8", "trainer.val_every=0",
         "rollout.max_new_tokens=12", "reward.num_workers=1", "logger.backends=[jsonl]",
         f"reward.function={Path(__file__).with_name('varied_reward.py')}:score", "trainer.lr=1e35"]


def run(run_dir: Path, policy: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mcore_r1.main", *SHORT, f"trainer.output_dir={run_dir}",
                           f"trainer.nonfinite={policy}", *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_stop_names_the_tensor(tmp_path):
    out = run(tmp_path / "run", "stop", "trainer.old_logprobs=recompute")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "step 2: non-finite actor/old_log_probs" in out.stderr, out.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_stop_on_policy_names_the_loss_before_any_update(tmp_path):
    out = run(tmp_path / "run", "stop")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "actor/loss = nan" in out.stderr and "step 2, phase step > update" in out.stderr, out.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_skip_drops_the_steps_and_keeps_finite_weights(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run(tmp_path / "run", "skip")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    records = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    assert sorted(records) == [1, 2, 3]
    assert "train/skipped" not in records[1] and math.isfinite(records[1]["actor/loss"])
    assert records[2]["train/skipped"] == 1.0 and records[3]["train/skipped"] == 1.0
    dcp_to_torch_save(str(tmp_path / "run" / "checkpoints" / "step_000003" / "model"), str(tmp_path / "m.pt"))
    weights = torch.load(tmp_path / "m.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in weights.values() if isinstance(t, torch.Tensor))
