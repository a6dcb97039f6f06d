"""The main job, as the README's Quickstart runs it (`python -m mcore_r1.main`), shortened to
two RL steps, on a fresh cache: it builds the tiny model and data, starts Ray with two hybrid
workers (Megatron TP=2 + colocated vLLM), trains, and writes finite metrics."""

import math
import os
import subprocess
import sys
from pathlib import Path

from mcore_r1.trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("reward/overall", "reward/accuracy", "actor/loss", "actor/grad_norm", "actor/clipfrac",
        "actor/entropy", "response/length_mean", "perf/tokens_per_s", "timing/rollout",
        "timing/update", "timing/refit", "val/accuracy", "mismatch/mismatch_abs_max")


def test_default_job_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_R1_")}
    env["MCORE_R1_CACHE"] = str(tmp_path / "cache")
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "mcore_r1.main", "trainer.total_steps=2", "trainer.val_every=1",
         "data.val_prompts=8", f"trainer.output_dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0, log
    assert "layout: world 2 = DP 1 x TP 2 x PP 1 x CP 1" in out.stdout + out.stderr, log
    assert (tmp_path / "cache" / "tiny_models").is_dir()  # built on first use
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        for key in KEYS:
            assert math.isfinite(record[key]), (key, record[key])
        assert record["mismatch/mismatch_abs_max"] < 1e-3  # vLLM samples from the trained weights
    assert math.isfinite(records[0]["val/accuracy"])
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert "step 2/2 | reward" in out.stdout + out.stderr  # the console line
