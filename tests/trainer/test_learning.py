"""The default job learns: `python -m mcore_r1.main` exactly as the README's Quickstart runs it
(tiny Qwen2.5-VL, synthetic counting, GRPO, TP=2 on two CPU processes) raises greedy
validation accuracy by at least 0.4 absolute between the first and the last validation, read
from the run's metrics.jsonl. About 9 minutes on the 2-core machine, hence `slow`."""

import subprocess
import sys
from pathlib import Path

import pytest

from mcore_r1.trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_GAIN = 0.4


@pytest.mark.slow
@pytest.mark.timeout(45 * 60)
def test_default_job_learns_to_count(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "mcore_r1.main", f"trainer.output_dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=40 * 60)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    curve = [(r["step"], r["val/accuracy"]) for r in read_metrics(run_dir / "metrics.jsonl")
             if "val/accuracy" in r]
    print("validation accuracy by step:", curve)
    (first_step, first), (last_step, last) = curve[0], curve[-1]
    assert first_step == 0 and last_step == 120
    assert first <= 0.35, f"the warm-started model already counts ({first:.3f}): the demo proves nothing"
    assert last - first >= REQUIRED_GAIN, curve
