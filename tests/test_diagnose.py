"""`python -m mcore_r1.diagnose`: versions, devices, Ray and a composed run's layout."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def diagnose(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mcore_r1.diagnose", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_versions_devices_and_layout():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "mcore_r1.diagnose", "+experiment=qwen3_8b"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"torch {metadata.version('torch')}" in text
    assert f"megatron-core {metadata.version('megatron-core')}" in text
    assert f"ray {metadata.version('ray')}" in text
    assert "vLLM 0.32.0" in text and "TransformerEngine" in text and "apex" in text
    assert "CUDA available:" in text and "RAY_ADDRESS not set" in text
    assert "world 8 = DP 2 x TP 4 x PP 1 x CP 1" in text and "validates" in text


def test_unreachable_ray_cluster_is_reported_not_started():
    out = diagnose("--ray-timeout", "5", env={"RAY_ADDRESS": "127.0.0.1:1"})
    assert out.returncode == 0, out.stderr
    assert "RAY_ADDRESS=127.0.0.1:1" in out.stdout
    assert "did not answer" in out.stdout or "not reachable" in out.stdout
