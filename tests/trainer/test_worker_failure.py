"""A dead, failing or stuck worker stops the run within bounded time and is named.

The fast tests drive `WorkerGroup`'s waiting with small Ray actors on a local Ray: one rank
raises or dies while its peer hangs (as a peer blocked in a collective would), and the call
must still end promptly, naming the failing rank. The end-to-end test SIGKILLs one hybrid worker
of a real run mid-training and checks that the driver exits non-zero within a minute, naming the
worker's rank and pid.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from mcore_r1.trainer.placement import WorkerFailure, WorkerGroup, WorkerTimeout
from tests.trainer.processes import kill_session, session_pids
from tests.trainer.test_presets import SHORT

ROOT = Path(__file__).resolve().parents[2]


class Member:
    """A stand-in worker: `work(how)` returns its rank, raises, hangs, or kills its process."""

    def __init__(self, rank: int):
        self.rank = rank

    def pid(self) -> int:
        return os.getpid()

    def work(self, how: str, delay: float = 0.0):
        time.sleep(delay)
        if how == "raise":
            raise ValueError(f"boom on rank {self.rank}")
        if how == "hang":  # like a peer waiting in a collective for a rank that is gone
            time.sleep(3600)
        if how == "die":
            os._exit(1)
        return self.rank

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def local_ray():
    # address="local": a private cluster even if another one was started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def group(n: int, timeout_s: float = 60.0) -> WorkerGroup:
    actor = ray.remote(num_cpus=0)(Member)
    g = WorkerGroup.from_actors([actor.remote(r) for r in range(n)], "Member", timeout_s=60)
    g.timeout_s = timeout_s  # for the calls under test; starting the processes takes seconds
    return g


def alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].startswith(" Z")
    except FileNotFoundError:
        return False


def timed_failure(g: WorkerGroup, hows: list) -> tuple[WorkerFailure, float]:
    start = time.monotonic()
    with pytest.raises(WorkerFailure) as info:
        g.call_each("work", hows)
    return info.value, time.monotonic() - start


def test_results_come_in_rank_order_and_placement_is_recorded(local_ray, tmp_path, capsys):
    g = group(3)
    try:
        assert g.call_each("work", [("ok", 0.3), ("ok", 0.0), ("ok", 0.1)]) == [0, 1, 2]
        pids = g.call("pid")
        assert [p["pid"] for p in g.placement] == pids
        assert all(p["node_id"] and p["node_ip"] for p in g.placement)
        assert g.describe_placement().splitlines()[1].startswith(f"rank 1: node {g.placement[1]['node_ip']}")
        g.write_placement(tmp_path / "run" / "placement.json")
        written = json.loads((tmp_path / "run" / "placement.json").read_text())
        assert written["world"] == 3 and written["nodes"] == 1
        assert [r["pid"] for r in written["ranks"]] == pids
    finally:
        g.shutdown(timeout_s=30)
    # A healthy group closes gracefully: `close`, then the processes exit by themselves.
    assert "did not close cleanly" not in capsys.readouterr().out
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids)


def test_a_raising_worker_ends_the_call_while_its_peer_hangs(local_ray):
    g = group(2)
    pid = g.placement[1]["pid"]
    err, seconds = timed_failure(g, [("hang",), ("raise",)])
    # Waits SETTLE_S for a dead peer that could explain the error, no longer.
    assert seconds < 15, seconds
    assert (err.rank, err.pid, err.method) == (1, pid, "work")
    assert str(err).startswith(f"worker rank 1 (pid {pid} on node {err.node}) failed during Member.work:")
    assert "ValueError: boom on rank 1" in str(err)  # the worker's own traceback, last lines
    assert isinstance(err.cause, ValueError)  # what the worker raised, for callers that care
    start = time.monotonic()
    g.shutdown(timeout_s=120)  # must not wait for the hanging rank to answer `close`
    assert time.monotonic() - start < 10


def test_a_dead_worker_is_named_at_once(local_ray):
    g = group(2)
    pid = g.placement[1]["pid"]
    err, seconds = timed_failure(g, [("hang",), ("die",)])
    assert seconds < 10, seconds
    assert (err.rank, err.pid) == (1, pid)
    assert isinstance(err.cause, ray.exceptions.RayActorError)
    assert f"worker rank 1 (pid {pid} on node {err.node}) died during Member.work" in str(err)
    # The failed group refuses new calls instead of queueing them behind the stuck rank.
    with pytest.raises(WorkerFailure, match="not calling Member.pid: the workers failed earlier"):
        g.call("pid")
    g.shutdown()


def test_the_death_is_reported_rather_than_the_error_it_caused(local_ray):
    """Rank 0 raises first (as gloo does when a peer's socket closes); rank 1 died: the message
    names rank 1's death as the cause."""
    g = group(2)
    err, _ = timed_failure(g, [("raise",), ("die", 1.0)])
    assert err.rank == 1 and "died during Member.work" in str(err), str(err)
    assert "also failed, probably as a consequence: rank(s) 0" in str(err)
    g.shutdown()


def test_a_stuck_call_times_out_naming_the_silent_ranks(local_ray):
    g = group(3, timeout_s=2)
    err, seconds = timed_failure(g, [("ok",), ("hang",), ("hang",)])
    assert isinstance(err, WorkerTimeout)
    assert 2 <= seconds < 6, seconds
    assert err.ranks == (1, 2) and err.rank == 1
    assert "did not finish Member.work within 2 s (trainer.worker_timeout_s)" in str(err)
    assert f"rank 2 (pid {g.placement[2]['pid']} on node" in str(err)
    g.shutdown()


def test_with_context_keeps_class_and_attributes():
    err = WorkerTimeout("worker rank 1 did not finish", 1, "10.0.0.2", 42, "refit", [1, 3])
    wrapped = err.with_context("step 7, phase refit")
    assert type(wrapped) is WorkerTimeout and str(wrapped) == "step 7, phase refit: worker rank 1 did not finish"
    assert (wrapped.rank, wrapped.node, wrapped.pid, wrapped.method, wrapped.ranks) == (1, "10.0.0.2", 42, "refit", (1, 3))
    assert str(err) == "worker rank 1 did not finish"  # the original is untouched


# -- end to end: SIGKILL one hybrid worker of a real run ---------------------------------------

def wait_for_step(path: Path, driver: subprocess.Popen, timeout_s: float, stderr: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert driver.poll() is None, (f"the run ended early with status {driver.returncode}:\n"
                                       + stderr.read_text()[-3000:])
        # Only complete lines: the logger may be half-way through appending one.
        lines = path.read_text().split("\n")[:-1] if path.is_file() else []
        if any(json.loads(line)["step"] >= 1 for line in lines if line.strip()):
            return
        time.sleep(1)
    raise AssertionError(f"no training step in {path} after {timeout_s} s")


@pytest.mark.timeout(900)
def test_killing_a_worker_mid_run_stops_the_driver_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the driver's own local Ray
    overrides = [o for o in SHORT if not o.startswith("trainer.total_steps=")]
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    # Two ranks, so the survivor is left blocked in a collective with the dead one; far more
    # steps than the test will wait for.
    driver = subprocess.Popen(
        [sys.executable, "-m", "mcore_r1.main", "+experiment=tiny_text_grpo", *overrides,
         "trainer.devices_per_node=2", "trainer.total_steps=100000", "trainer.save_checkpoints=false",
         f"trainer.output_dir={run_dir}"],
        cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        wait_for_step(run_dir / "metrics.jsonl", driver, 600, tmp_path / "stderr.txt")
        # Ray names worker processes after their actor class; only this run's session counts
        # (another run on the machine has its own workers).
        workers = sorted(pid for pid, cmd in session_pids(driver.pid).items()
                         if cmd.startswith("ray::HybridWorker"))
        assert len(workers) == 2, session_pids(driver.pid)
        victim = workers[-1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        status = driver.wait(timeout=60)
        seconds = time.monotonic() - killed_at
        stderr = (tmp_path / "stderr.txt").read_text()
        assert status == 1, stderr[-4000:]
        named = re.search(rf"mcore_r1: .*worker rank (\d) \(pid {victim} on node [^)]+\) died during "
                          r"HybridWorker\.\w+", stderr)
        assert named, stderr[-4000:]
        print(f"driver exited {seconds:.1f} s after the kill: {named.group(0)}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["actor/loss"]) for r in records if r["step"] >= 1)
        # The driver's exit took its local Ray down with it: nothing of the run is left.
        deadline = time.monotonic() + 30
        while session_pids(driver.pid) and time.monotonic() < deadline:
            time.sleep(1)
        assert not session_pids(driver.pid), session_pids(driver.pid)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        kill_session(driver.pid)
        out.close()
        err.close()
