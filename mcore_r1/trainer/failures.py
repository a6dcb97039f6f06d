"""Waiting for the workers without ever hanging: `wait_all` and the errors it raises.

The workers run every method as one collective step. When one of them dies (SIGKILL, OOM
killer, segfault) or raises, its peers stay blocked forever in a gloo/NCCL collective waiting
for it, so a plain `ray.get` over all ranks would never return. `wait_all` polls with
`ray.wait` instead and raises `WorkerFailure` as soon as any rank's result is an error, and
`WorkerTimeout` once the call has run longer than `trainer.worker_timeout_s`. The message names
the rank, its pid and node (from the placement recorded at start-up) and the method, so the
operator knows whose log to read.

A rank that raised may only be reporting a peer's death (gloo: "connection closed by peer"),
and Ray reports the death itself a moment later; so after a raise, `wait_all` waits up to
`SETTLE_S` for a death and names the dead rank as the cause if there is one.
"""

from __future__ import annotations

import copy
import re
import time
from typing import Any, Optional, Sequence

POLL_S = 1.0     # how often a waiting call looks at its workers (and at the clock)
SETTLE_S = 5.0   # after a worker raised: how long to look for a dead peer that explains it
TRACE_LINES = 8  # lines of a worker's traceback kept in the message


class WorkerFailure(RuntimeError):
    """A worker died or raised during a call: which rank, its pid and node (IP), which method.
    `cause` is Ray's error for that rank; for an exception raised in the worker it is also an
    instance of the worker's exception class (Ray's RayTaskError subclasses it), so
    `isinstance(failure.cause, SomeError)` tells what the worker raised."""

    def __init__(self, message: str, rank: Optional[int] = None, node: Optional[str] = None,
                 pid: Optional[int] = None, method: str = "", cause: Optional[BaseException] = None):
        super().__init__(message)
        self.rank, self.node, self.pid, self.method, self.cause = rank, node, pid, method, cause

    def with_context(self, text: str) -> "WorkerFailure":
        """The same failure (same class and attributes), its message prefixed with `text`."""
        new = copy.copy(self)
        new.args = (f"{text}: {self.args[0]}",)
        return new


class WorkerTimeout(WorkerFailure):
    """A call did not finish within `trainer.worker_timeout_s`; `ranks` had not answered."""

    def __init__(self, message: str, rank: Optional[int] = None, node: Optional[str] = None,
                 pid: Optional[int] = None, method: str = "", ranks: Sequence[int] = ()):
        super().__init__(message, rank, node, pid, method)
        self.ranks = tuple(ranks)


def wait_all(refs: list, ranks: Optional[Sequence[int]], method: str, name: str,
             placement: Sequence[dict], timeout_s: float) -> list:
    """The results of `refs` (made by ranks `ranks`, default 0..n-1), in that order; or
    `WorkerFailure` as soon as one fails, or `WorkerTimeout` after `timeout_s`. `placement[rank]`
    has the rank's node_ip/node_id/pid for the message (None where not known yet)."""
    import ray

    rank_of = dict(zip(refs, ranks if ranks is not None else range(len(refs))))
    results: dict[int, Any] = {}
    failures: list[tuple[int, BaseException]] = []
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timeout(sorted(rank_of[r] for r in pending), f"{name}.{method}", placement, timeout_s)
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(POLL_S, left))
        _collect(ready, rank_of, results, failures)
        if failures:
            settle_until = time.monotonic() + SETTLE_S
            while pending and not any(_died(e) for _, e in failures) and time.monotonic() < settle_until:
                ready, pending = ray.wait(pending, num_returns=len(pending),
                                          timeout=min(POLL_S, max(0.0, settle_until - time.monotonic())))
                _collect(ready, rank_of, results, failures)
            raise _failure(failures, f"{name}.{method}", method, placement)
    return [results[rank_of[r]] for r in refs]


def _collect(ready: list, rank_of: dict, results: dict, failures: list) -> None:
    import ray

    for ref in ready:
        try:
            results[rank_of[ref]] = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - RayActorError, RayTaskError: reported by rank
            failures.append((rank_of[ref], err))


def _who(rank: int, placement: Sequence[dict]) -> str:
    p = placement[rank]
    pid = f"pid {p['pid']} " if p.get("pid") else ""
    return f"worker rank {rank} ({pid}on node {p.get('node_ip') or p.get('node_id') or '?'})"


def _failure(failures: list, call: str, method: str, placement: Sequence[dict]) -> WorkerFailure:
    rank, err = next(((r, e) for r, e in failures if _died(e)), failures[0])  # the cause first
    p = placement[rank]
    what = "died" if _died(err) and not getattr(err, "actor_init_failed", False) else "failed"
    summary = _summary(err, p.get("pid"))
    message = (f"{_who(rank, placement)} {what} during {call}:"
               + (summary if summary.startswith("\n") else " " + summary))
    others = sorted(r for r, _ in failures if r != rank)
    if others:
        message += f"\n(also failed, probably as a consequence: rank(s) {', '.join(map(str, others))})"
    return WorkerFailure(message, rank, p.get("node_ip"), p.get("pid"), method, cause=err)


def _timeout(missing: list[int], call: str, placement: Sequence[dict], timeout_s: float) -> WorkerTimeout:
    p = placement[missing[0]]
    message = (f"{_who(missing[0], placement)} did not finish {call} within {timeout_s:g} s "
               "(trainer.worker_timeout_s); rank(s) without an answer: "
               + "; ".join(_who(r, placement)[len("worker "):] for r in missing))
    return WorkerTimeout(message, missing[0], p.get("node_ip"), p.get("pid"), call.split(".")[-1], missing)


def _died(err: BaseException) -> bool:
    import ray

    return isinstance(err, ray.exceptions.RayActorError)


def _summary(err: BaseException, pid: Optional[int]) -> str:
    """The useful part of a Ray error: the last lines of a worker's traceback (they end with the
    exception), or the first line of Ray's death notice, its exit detail and where the log is."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # Ray colours the remote header
    if not _died(err) or getattr(err, "actor_init_failed", False):
        lines = [line for line in text.splitlines()[1:]  # [0]: "ray::Class.method() (pid=...)"
                 if line.strip(" ^~")]  # drop Python's caret markers
        return "\n" + "\n".join(lines[-TRACE_LINES:] or [text])
    first = text.splitlines()[0] if text else type(err).__name__
    detail = text.split("Worker exit detail:", 1)
    detail = f" Exit detail: {detail[1].split('.')[0].strip()}." if len(detail) > 1 else ""
    log = f"logs/worker-*-{pid}.err" if pid else "logs/worker-*.err"
    return (f"{first}{detail} No Python exception: killed (e.g. by the OOM killer) or crashed; "
            f"see {log} in the Ray session directory on that node (default /tmp/ray/session_latest).")
