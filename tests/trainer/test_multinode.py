"""Multi-node placement with two Ray nodes on this machine: a head and a second node started
with `ray start`, one CPU each, so a `trainer.nnodes=2 x trainer.devices_per_node=1` run must
span both. The tiny experiment joins the cluster through RAY_ADDRESS, trains 2 steps with one
rank per node (torch.distributed across the two nodes' workers), and its placement.json shows
the two ranks on two different nodes.

The cluster is private to the test: its own temp dir (so no other `ray.init()` on the machine
finds it through /tmp/ray/ray_current_cluster), its own ports, and each node runs under
`ray start --block` in its own session, so teardown stops exactly these processes (not
`ray stop --force`, which would also kill any other Ray run on the machine).
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mcore_r1.trainer.metrics import read_metrics
from tests.ports import free_ports
from tests.trainer.processes import stop_session
from tests.trainer.test_presets import SHORT

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def wait_for_nodes(address: str, count: int, env: dict, timeout_s: float = 120) -> None:
    """Until the cluster reports `count` alive nodes (asked from a separate process, so this
    test process never becomes a Ray driver)."""
    probe = (f"import time, ray; ray.init(address={address!r}, log_to_driver=False)\n"
             f"deadline = time.monotonic() + {timeout_s}\n"
             f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.monotonic() < deadline:\n"
             "    time.sleep(0.5)\n"
             f"raise SystemExit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=timeout_s + 60)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture
def two_node_cluster(tmp_path):
    # Short path: Ray's unix sockets live under the temp dir and have a length limit.
    temp_dir = tempfile.mkdtemp(prefix="r1ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray's head turns on token authentication by itself when ~/.ray/auth_token exists, but a
    # joining node does not, and is then refused: say it explicitly for every process.
    env["RAY_AUTH_MODE"] = "disabled"
    port, dashboard_port, client_port, *agent_ports = free_ports(5)
    address = f"127.0.0.1:{port}"

    def node_args() -> list[str]:  # one CPU each; its own agent port (the default is fixed)
        return ["--num-cpus", "1", "--disable-usage-stats", "--block",
                "--dashboard-agent-listen-port", str(agent_ports.pop())]

    logs, nodes = [], []

    def log(name: str):
        logs.append(open(tmp_path / name, "w"))
        return logs[-1]

    try:
        nodes.append(subprocess.Popen(
            [RAY, "start", "--head", "--port", str(port), "--temp-dir", temp_dir,
             "--include-dashboard=false", "--dashboard-port", str(dashboard_port),
             "--ray-client-server-port", str(client_port), *node_args()],
            env=env, stdout=log("head.log"), stderr=subprocess.STDOUT,
            start_new_session=True))
        wait_for_nodes(address, 1, env)
        nodes.append(subprocess.Popen(
            [RAY, "start", "--address", address, *node_args()],
            env=env, stdout=log("node2.log"), stderr=subprocess.STDOUT,
            start_new_session=True))
        wait_for_nodes(address, 2, env)
        yield address, env
    finally:
        for node in reversed(nodes):
            stop_session(node, grace_s=40)  # `ray start --block` drains its node on SIGTERM
        for f in logs:
            f.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(900)
def test_two_ranks_run_on_two_nodes(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    run_dir = tmp_path / "run"
    started = time.monotonic()
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
        status = subprocess.run(
            [sys.executable, "-m", "mcore_r1.main", "+experiment=tiny_text_grpo", *SHORT,
             "trainer.nnodes=2", "trainer.devices_per_node=1", f"trainer.output_dir={run_dir}"],
            cwd=ROOT, env={**env, "RAY_ADDRESS": address}, stdout=out, stderr=err,
            timeout=800).returncode
    log = (tmp_path / "stdout.txt").read_text()[-3000:] + (tmp_path / "stderr.txt").read_text()[-3000:]
    assert status == 0, log
    print(f"2-step run on the 2-node cluster: {time.monotonic() - started:.0f} s")
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] >= 1]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["actor/loss"]) for r in records)
    placement = json.loads((run_dir / "placement.json").read_text())
    assert placement["world"] == 2 and placement["nodes"] == 2, placement
    ranks = placement["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["node_id"] != ranks[1]["node_id"], ranks
    assert all(r["pid"] for r in ranks)
