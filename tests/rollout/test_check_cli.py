"""`python -m mcore_r1.rollout.check` prints per-refit parity and exits non-zero above
tolerance (a tolerance no result can meet forces the failure path)."""

import os
import subprocess
import sys

import pytest

from mcore_r1.models.tiny import ensure_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(ensure_tiny_model("qwen2", tmp_path_factory.mktemp("tiny")))


def run_check(*args):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "mcore_r1.rollout.check", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_check_passes_and_fails_on_tolerance(model_dir):
    ok = run_check("--hf", model_dir, "--refits", "2")
    lines = [line for line in ok.stdout.splitlines() if line.startswith("refit ")]
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-3000:]
    assert len(lines) == 2 and all(line.endswith("OK") for line in lines), lines

    bad = run_check("--hf", model_dir, "--refits", "1", "--mean-tol", "-1")
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-3000:]
    assert "ABOVE TOLERANCE" in bad.stdout
