"""The Slurm launcher `launch/slurm/ray_job.sbatch` on a real Slurm: Debian's slurmctld, slurmd
and munge (installed with apt-get when missing) run a cluster on this machine, and the launcher
is submitted with sbatch like on a cluster. One job brings up Ray on one node and trains the
tiny experiment for 2 steps on CPU. A second job spans two nodes (the second is another slurmd
on this host), so the head and a worker node come up as separate srun steps; the worker's
raylet is then killed while the driver runs, and the job must fail within seconds.

The cluster is private to the tests: its config, state, spool and logs live in a temp dir
(SLURM_CONF points there), its daemons listen on free ports and run in their own sessions, so
teardown stops exactly what the tests started (munged only if it was not already running). The
jobs' Ray uses its own temp dir and ports. Processes of a job are recognised by SLURM_JOB_ID in
their environment (Ray passes it on); none may outlive the job (the launcher's teardown)."""

import math
import os
import re
import shutil
import socket
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mcore_r1.trainer.metrics import read_metrics
from tests.ports import free_port, free_port_range, free_ports
from tests.trainer.processes import stop_session
from tests.trainer.test_presets import SHORT

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launch" / "slurm" / "ray_job.sbatch"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return f"--- {path} ---\n" + path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"--- {path}: missing ---"


def ensure_installed() -> None:
    """Install Slurm and munge with apt-get when missing (the packages are left installed)."""
    if all(which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged", "munge")):
        return
    if not which("apt-get"):
        pytest.skip("Slurm/munge are not installed and apt-get is not available to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y",
               "--no-install-recommends", *PACKAGES]
    out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:  # stale package lists: refresh them once
        update = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True,
                                timeout=600)
        if update.returncode != 0:
            pytest.skip(f"apt-get cannot reach its package sources: {update.stderr[-1000:]}")
        out = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def munge_works() -> bool:
    munge = subprocess.run([which("munge"), "-n"], capture_output=True, timeout=10)
    if munge.returncode != 0:
        return False
    return subprocess.run([which("unmunge")], input=munge.stdout, capture_output=True,
                          timeout=10).returncode == 0


def wait_until(check, timeout_s: float, what: str, logs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s:g} s\n" + "\n".join(tail(p) for p in logs))
        time.sleep(0.5)


def start_daemon(cmd: list[str], log: Path, env=None) -> subprocess.Popen:
    """In its own session (so that stopping it stops all it started), output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def start_munged(logs: Path) -> subprocess.Popen | None:
    """munged as the munge user, unless one already answers (then it is not ours to stop)."""
    if munge_works():
        return None
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        create = (["mungekey", "--create", "--keyfile", str(key)] if which("mungekey")
                  else ["create-munge-key", "-f"])
        subprocess.run([which(create[0]), *create[1:]], check=True, capture_output=True, timeout=60)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
    for d in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    # --force: a socket left by a munged that died is not a reason to refuse.
    proc = start_daemon(["runuser", "-u", "munge", "--", which("munged"), "-F", "--force"],
                        logs / "munged.log")
    wait_until(munge_works, 30, "munged did not answer", [logs / "munged.log"])
    return proc


def slurm_conf(base: Path, hardware: str, nodes: dict[str, int]) -> str:
    """Nodes NAME -> slurmd port, all on this host with its real `hardware` (CPUs, memory). No
    cgroups for processes or tasks (linuxproc tracks a job's processes by parentage); root runs
    everything; `%n` (the node name) keeps the slurmds' spool, pid and log files apart."""
    host = socket.gethostname().split(".")[0]
    return "\n".join([
        "ClusterName=r1test",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={free_port()}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge",
        f"StateSaveLocation={base}/state", f"SlurmdSpoolDir={base}/spool_%n",
        f"SlurmctldPidFile={base}/slurmctld.pid", f"SlurmdPidFile={base}/slurmd_%n.pid",
        f"SlurmctldLogFile={base}/logs/slurmctld.log", f"SlurmdLogFile={base}/logs/slurmd_%n.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "ReturnToService=2", "KillWait=10",
        *(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {hardware} "
          "State=UNKNOWN" for name, port in nodes.items()),
        f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n"


@dataclass
class Cluster:
    env: dict       # for Slurm commands (SLURM_CONF)
    nodes: list     # node names; the first is this host's short name
    cpus: int       # CPUs of each node (all are this machine)
    logs: Path      # daemon logs


@pytest.fixture(scope="module")
def slurm():
    """This host as node `hostname -s`, and a second slurmd on it as node `<hostname -s>-2`:
    Slurm runs several slurmds on one host (`slurmd -N NAME`, its own port), which gives the
    launcher a real two-node allocation (its worker-node path) on one machine."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld, slurmd and munged needs root")
    ensure_installed()
    # Short path: slurmd puts unix sockets of its steps in the spool dir.
    base = Path(tempfile.mkdtemp(prefix="r1slurm-", dir="/tmp"))
    logs = base / "logs"
    daemons = []
    slurm_started = False
    try:
        host = socket.gethostname().split(".")[0]
        nodes = dict(zip((host, f"{host}-2"), free_ports(2)))
        for d in ("state", "logs", *(f"spool_{n}" for n in nodes)):
            (base / d).mkdir()
        munged = start_munged(logs)
        if munged is not None:
            daemons.append(munged)
        # `slurmd -C`: this machine as a slurm.conf node line (its real CPUs and RealMemory).
        node_line = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True,
                                   check=True, timeout=60).stdout.splitlines()[0]
        hardware = node_line.split(" ", 1)[1]
        cpus = int(re.search(r"\bCPUs=(\d+)", hardware).group(1))
        (base / "slurm.conf").write_text(slurm_conf(base, hardware, nodes))
        (base / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(SLURM_CONF=str(base / "slurm.conf"), PATH=SEARCH_PATH)
        slurm_started = True
        commands = {"slurmctld": [which("slurmctld"), "-D"],
                    **{f"slurmd_{n}": [which("slurmd"), "-D", "-N", n] for n in nodes}}
        for name, cmd in commands.items():
            daemons.append(start_daemon(cmd, logs / f"{name}.out", env))

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env,
                                 capture_output=True, text=True, timeout=30)
            return sorted(out.stdout.split()) == sorted([*nodes, *["idle"] * len(nodes)])

        wait_until(idle, 60, "the nodes did not become idle", sorted(logs.iterdir()))
        yield Cluster(env, list(nodes), cpus, logs)
    finally:
        if slurm_started:  # no job of these tests may outlive them
            env_ = {**os.environ, "SLURM_CONF": str(base / "slurm.conf"), "PATH": SEARCH_PATH}
            subprocess.run(["scancel", "--user", "root"], env=env_, capture_output=True,
                           timeout=60)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "-h"], env=env_, capture_output=True, text=True,
                    timeout=30).stdout.strip():
                time.sleep(1)
        for proc in reversed(daemons):
            stop_session(proc, drain_s=0)
        shutil.rmtree(base, ignore_errors=True)


def job_processes(job_id: str) -> dict[int, tuple[str, str]]:
    """Live processes started by Slurm job `job_id` (Ray passes its environment on to all its
    processes): pid -> (command line, the node they run on)."""
    marker = f"SLURM_JOB_ID={job_id}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if marker in environ:
                node = next((v[len(b"SLURMD_NODENAME="):].decode() for v in environ
                             if v.startswith(b"SLURMD_NODENAME=")), "?")
                found[int(entry.name)] = ((entry / "cmdline").read_bytes().replace(
                    b"\0", b" ").decode(errors="replace").strip(), node)
        except OSError:
            continue
    return found


def job_info(env: dict, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def fixed_ports() -> dict[str, str]:
    """Every port the launcher sets, explicitly: distinct, free on this machine, and none
    inside the workers' range (Ray refuses to start on such an overlap)."""
    names = ("PORT", "DASHBOARD_PORT", "CLIENT_SERVER_PORT", "NODE_MANAGER_PORT",
             "OBJECT_MANAGER_PORT", "RUNTIME_ENV_AGENT_PORT", "DASHBOARD_AGENT_GRPC_PORT",
             "METRICS_EXPORT_PORT", "DASHBOARD_AGENT_LISTEN_PORT")
    ports = {f"MCORE_R1_RAY_{name}": str(port)
             for name, port in zip(names, free_ports(len(names)))}
    first, last = free_port_range(200)
    ports.update(MCORE_R1_RAY_MIN_WORKER_PORT=str(first), MCORE_R1_RAY_MAX_WORKER_PORT=str(last))
    return ports


# Ray nodes sharing a host cannot share fixed ports: empty leaves the flag out (Ray picks a free
# port), 0 asks for a free one where Ray's default is a fixed port.
SHARED_HOST_PORTS = {
    **{f"MCORE_R1_RAY_{name}_PORT": "" for name in (
        "NODE_MANAGER", "OBJECT_MANAGER", "RUNTIME_ENV_AGENT", "DASHBOARD_AGENT_GRPC",
        "METRICS_EXPORT")},
    "MCORE_R1_RAY_DASHBOARD_AGENT_LISTEN_PORT": "0",
    "MCORE_R1_RAY_MIN_WORKER_PORT": "0", "MCORE_R1_RAY_MAX_WORKER_PORT": "0"}


class Job:
    """One submission of the launcher, with what the tests look at afterwards."""

    def __init__(self, cluster: Cluster, tmp: Path, nodes: int, overrides: list[str],
                 ports: dict[str, str], **extra_env: str):
        self.cluster, self.env, self.tmp = cluster, cluster.env, tmp
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="r1ray-", dir="/tmp"))
        self.run_dir = tmp / "run"
        self.log_dir = tmp / "logs"
        job_env = {
            **cluster.env,
            "MCORE_R1_PYTHON": str(ROOT / ".venv" / "bin" / "python"),
            "MCORE_R1_DEVICES_PER_NODE": "1",
            # The head turns on token auth when ~/.ray/auth_token exists, and then refuses
            # nodes and drivers that do not (see tests/trainer/test_multinode.py).
            "RAY_AUTH_MODE": "disabled",
            # This machine is shared with other Ray runs: `ray stop` would end them too.
            "MCORE_R1_RAY_STOP": "0",
            "MCORE_R1_LOG_DIR": str(self.log_dir),
            "MCORE_R1_RAY_TMPDIR": str(self.ray_tmp),
            # Head-only ports, free on this machine (fixed_ports() sets its own).
            **dict(zip(("MCORE_R1_RAY_PORT", "MCORE_R1_RAY_DASHBOARD_PORT",
                        "MCORE_R1_RAY_CLIENT_SERVER_PORT"), map(str, free_ports(3)))),
            **ports,
            **extra_env,
        }
        cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0",
               f"--cpus-per-task={cluster.cpus}", f"--chdir={ROOT}",
               f"--output={tmp}/slurm-%j.out", str(LAUNCHER), "+experiment=tiny_text_grpo",
               f"trainer.output_dir={self.run_dir}", *overrides]
        out = subprocess.run(cmd, env=job_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        self.id = out.stdout.strip().split(";")[0]
        self.out = tmp / f"slurm-{self.id}.out"

    def info(self) -> dict:
        return job_info(self.env, self.id)

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def wait(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(1)
        subprocess.run(["scancel", self.id], env=self.env, timeout=30)
        pytest.fail(f"job {self.id} did not finish within {timeout_s:g} s\n{self.logs()}")

    def logs(self) -> str:
        node_logs = sorted(self.log_dir.glob("*.log")) if self.log_dir.exists() else []
        daemon_logs = sorted(self.cluster.logs.glob("slurmd_*.log"))
        return "\n".join([tail(self.out, 6000), *(tail(p) for p in node_logs),
                          *(tail(p, 1500) for p in daemon_logs)])

    def assert_no_leftovers(self) -> None:
        """No process of the job survives it (waiting a little for exiting ones)."""
        deadline = time.monotonic() + 30
        while job_processes(self.id) and time.monotonic() < deadline:
            time.sleep(1)
        left = job_processes(self.id)
        for pid in left:  # do not leave them to the next test either
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"processes of job {self.id} outlived it: {left}\n{self.logs()}"

    def cleanup(self) -> None:
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.mark.timeout(900)
def test_launcher_runs_two_steps(slurm, tmp_path):
    """One node, every Ray port set explicitly: the tiny experiment trains 2 steps."""
    started = time.monotonic()
    job = Job(slurm, tmp_path, 1, SHORT, fixed_ports())
    try:
        info = job.wait(600)
        elapsed = time.monotonic() - started
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
            f"{info.get('JobState')} {info.get('ExitCode')}\n{job.logs()}"
        print(f"job {job.id}: submitted to completed in {elapsed:.0f} s")
        records = [r for r in read_metrics(job.run_dir / "metrics.jsonl") if r["step"] >= 1]
        assert [r["step"] for r in records] == [1, 2], job.logs()
        assert all(math.isfinite(r["actor/loss"]) for r in records), records
        out = job.output()
        assert "Ray cluster up: 1 node(s)" in out, job.logs()
        assert "driver exited with status 0" in out, job.logs()
        # The driver was told the allocation's shape.
        assert "trainer.nnodes=1 trainer.devices_per_node=1" in out, out
        # One log per node, named after it.
        node_log = job.log_dir / f"{info['BatchHost']}.log"
        assert "Ray runtime started" in node_log.read_text(), job.logs()
        job.assert_no_leftovers()
    finally:
        job.cleanup()


@pytest.mark.timeout(900)
def test_launcher_fails_fast_when_a_node_dies(slurm, tmp_path):
    """Two nodes: the head and a worker node joined through `srun -w`. The worker node's raylet
    is killed just after the driver started: the launcher sees that node's Ray step end, stops
    the driver and fails the job within seconds, where the run would take minutes."""
    overrides = [o for o in SHORT if not o.startswith("trainer.total_steps=")]
    job = Job(slurm, tmp_path, 2, [*overrides, "trainer.total_steps=1000"], SHARED_HOST_PORTS,
              MCORE_R1_DRIVER_STOP_TIMEOUT="10")
    try:
        # The launcher starts the driver right after this line.
        deadline = time.monotonic() + 300
        while "Ray cluster up" not in job.output():
            assert job.info().get("JobState") not in FINAL_STATES, job.logs()
            assert time.monotonic() < deadline, job.logs()
            time.sleep(0.5)
        out = job.output()
        assert "Ray cluster up: 2 node(s)" in out, job.logs()
        assert "trainer.nnodes=2 trainer.devices_per_node=1" in out, out
        head = job.info()["BatchHost"]
        worker = next(n for n in slurm.nodes if n != head)
        time.sleep(1)
        raylets = [pid for pid, (cmd, node) in job_processes(job.id).items()
                   if cmd.split(" ")[0].endswith("/raylet") and node == worker]
        assert len(raylets) == 1, job_processes(job.id)
        killed = time.monotonic()
        os.kill(raylets[0], signal.SIGKILL)
        info = job.wait(120)
        took = time.monotonic() - killed
        print(f"job {job.id} ended {took:.0f} s after the raylet of {worker} was killed: "
              f"{info['JobState']} {info['ExitCode']}")
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", job.logs()
        out = job.output()
        assert f"error: Ray on {worker} exited" in out and "stopping the driver" in out, job.logs()
        assert took < 30, job.logs()
        assert not (job.run_dir / "metrics.jsonl").exists(), job.logs()
        # Both nodes had their own log.
        assert {p.name for p in job.log_dir.glob("*.log")} >= {f"{head}.log", f"{worker}.log"}
        job.assert_no_leftovers()
    finally:
        job.cleanup()
