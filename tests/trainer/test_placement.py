"""Placement is checked against the cluster before any worker starts, with the numbers."""

import subprocess
import sys
from pathlib import Path

import pytest

from mcore_r1.trainer.placement import NodeResources, PlacementError, check_fits, worker_threads

ROOT = Path(__file__).resolve().parents[2]


def nodes(*cpus_gpus):
    return [NodeResources(f"n{i}", f"10.0.0.{i}", c, g) for i, (c, g) in enumerate(cpus_gpus)]


def test_fits_when_enough_nodes_have_enough_devices():
    check_fits(2, 8, nodes((64, 8), (64, 8), (64, 4)), use_gpu=True)
    check_fits(1, 2, nodes((2, 0)), use_gpu=False)


@pytest.mark.parametrize("nnodes, per_node, cluster, use_gpu, expect", [
    (1, 3, ((2, 0),), False, "1 x 3 = 3 CPU workers: 0 of 1 Ray node(s) have 3 CPU (10.0.0.0: 2 CPU)"),
    (2, 8, ((64, 8), (64, 4)), True, "2 x 8 = 16 GPU workers: 1 of 2 Ray node(s) have 8 GPU"),
    (1, 1, ((8, 0),), True, "1 x 1 = 1 GPU workers: 0 of 1 Ray node(s) have 1 GPU (10.0.0.0: 0 GPU)"),
])
def test_refuses_with_the_numbers(nnodes, per_node, cluster, use_gpu, expect):
    with pytest.raises(PlacementError) as err:
        check_fits(nnodes, per_node, nodes(*cluster), use_gpu)
    assert expect in str(err.value)


def test_main_refuses_an_unplaceable_run_before_starting_workers(tmp_path):
    """More CPU ranks than this machine's Ray has: exit 2, the arithmetic, no worker started."""
    import os

    wanted = (os.cpu_count() or 2) + 1
    out = subprocess.run(
        [sys.executable, "-m", "mcore_r1.main", "+experiment=tiny_text_grpo",
         f"trainer.devices_per_node={wanted}", f"trainer.mini_batch_size={wanted * 4}",
         f"data.prompts_per_step={wanted}", f"trainer.output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"1 x {wanted} = {wanted} CPU workers" in out.stderr
    assert "HybridWorker" not in out.stdout + out.stderr  # no worker process ever started


def test_cpu_workers_share_the_cores_of_the_smallest_node_used():
    nodes = [NodeResources("a", "10.0.0.1", 2.0, 0.0), NodeResources("b", "10.0.0.2", 8.0, 0.0),
             NodeResources("c", "10.0.0.3", 1.0, 0.0)]
    assert worker_threads(nodes, {"a"}, 1, use_gpu=False) == 2   # one worker, both cores
    assert worker_threads(nodes, {"a"}, 2, use_gpu=False) == 1   # the default TP=2 run
    assert worker_threads(nodes, {"a", "b"}, 2, use_gpu=False) == 1
    assert worker_threads(nodes, {"b"}, 3, use_gpu=False) == 2   # 8 // 3
    assert worker_threads(nodes, {"c"}, 2, use_gpu=False) == 1   # never zero
    assert worker_threads(nodes, {"b"}, 1, use_gpu=True) == 1    # GPU workers compute on the GPU
