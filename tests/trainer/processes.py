"""Process helpers for tests that start Ray (or a driver that starts Ray) in a new session:
everything such a test started shares that session id, whatever its process group, so it can
be found and stopped without touching other Ray runs on the machine."""

import os
import signal
import subprocess
import time
from pathlib import Path


def session_pids(sid: int) -> dict[int, str]:
    """Live processes of session `sid` (pid -> command line, which Ray sets to e.g.
    `ray::HybridWorker.train_mini_batch` for an actor's process)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # The fields after the parenthesised name (which may hold spaces): state ppid pgrp session.
        state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            found[int(entry.name)] = cmdline.strip()
    return found


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_session(proc: subprocess.Popen, grace_s: float = 30, drain_s: float = 10) -> None:
    """SIGTERM to `proc` (a session leader: a Ray node, a daemon), up to `grace_s` for it to exit,
    SIGKILL if not; then up to `drain_s` for the rest of its session, and SIGKILL what remains."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    deadline = time.monotonic() + drain_s
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    kill_session(proc.pid)
