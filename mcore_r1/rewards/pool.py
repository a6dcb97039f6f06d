"""Scoring in worker processes with a per-item timeout: a reward can never hang training.

Why processes and not threads: a grader stuck in C code (sympy, a regex with catastrophic
backtracking, a ``while True``) cannot be interrupted inside a thread; a process can be killed.
Why our own small pool and not ``concurrent.futures``: its executors cannot cancel a running
call, so one stuck item would block a worker forever.

Protocol: each worker loads the function from its spec (spawn context: no inherited CUDA, vLLM
or lock state), says ``ready``, then handles one task at a time; a task is one sample, or a
chunk of samples for batch functions. The parent waits on all pipes with a deadline:

* result in time -> used;
* the function raised or returned something invalid -> fallback score, ``errors`` counter;
* deadline passed -> the worker is killed and replaced, fallback score, ``timeouts`` counter;
* the worker died (segfault, ``os._exit``) -> replaced, fallback score, ``crashes`` counter.

The deadline starts when a task is sent to a ready worker, so slow worker start-up (imports)
never counts against an item. ``num_workers=0`` scores in-process without any timeout
(debugging only).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

from mcore_r1.rewards.loader import RewardFunctionError, call, load_reward_function

log = logging.getLogger("mcore_r1.rewards")

START_TIMEOUT_S = 300.0  # a worker that cannot import the reward function in 5 minutes is broken
MAX_START_FAILURES = 3   # workers dying before they are ready: respawning forever would hang


def _worker_main(conn: Connection, spec: str, kwargs: dict) -> None:
    try:
        rf = load_reward_function(spec)
    except Exception as err:
        conn.send(("load_error", None, f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None, None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message is None:
            return
        task_id, samples = message
        try:
            conn.send(("ok", task_id, call(rf, samples, kwargs)))
        except Exception as err:
            # The whole traceback: the user needs the line of their reward that failed.
            conn.send(("error", task_id, traceback.format_exc().rstrip()))


def describe_sample(index: int, sample: dict, limit: int = 300) -> str:
    """A one-line, truncated view of a sample for error reports."""
    def cut(text: Any) -> str:
        text = str(text)
        return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"

    return (f"#{index}: response={cut(sample.get('response', ''))!r} "
            f"ground_truth={cut(sample.get('ground_truth', ''))!r} "
            f"prompt={cut(sample.get('prompt', ''))!r}")


@dataclass
class _Worker:
    process: Any
    conn: Connection
    started: float
    ready: bool = False
    task: Optional[int] = None
    deadline: float = 0.0


class ScoringPool:
    """Score lists of samples with `spec` in `num_workers` processes; see the module docstring."""

    def __init__(self, spec: str, kwargs: Optional[dict] = None, num_workers: int = 2,
                 timeout_s: float = 10.0, fallback: float = 0.0, batched: bool = False):
        if num_workers < 0 or timeout_s <= 0:
            raise ValueError(f"need num_workers >= 0 and timeout_s > 0 (got {num_workers}, {timeout_s})")
        self.spec, self.kwargs = spec, dict(kwargs or {})
        self.timeout_s, self.fallback, self.batched = timeout_s, float(fallback), batched
        self.counters: Counter = Counter()
        self._ctx = mp.get_context("spawn")
        self._local = load_reward_function(spec) if num_workers == 0 else None
        self._start_failures = 0
        self._samples: list[dict] = []
        self._workers = [self._spawn() for _ in range(num_workers)]

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.spec, self.kwargs), daemon=True,
                                 name="mcore_r1-reward")
        proc.start()
        child.close()
        return _Worker(proc, parent, time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(timeout=10)
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._spawn()

    def score(self, samples: list[dict]) -> list[dict[str, float]]:
        """One result dict per sample, in order; failures get ``{"overall": fallback}``."""
        if self._local is not None:
            return call(self._local, samples, self.kwargs)
        self._samples = samples  # for failure reports
        results: list[Optional[dict]] = [None] * len(samples)
        chunk = -(-len(samples) // len(self._workers)) if self.batched else 1
        task_items = dict(enumerate(list(range(i, min(i + chunk, len(samples))))
                                    for i in range(0, len(samples), chunk)))
        pending = deque(task_items)
        while pending or any(w.task is not None for w in self._workers):
            self._dispatch(pending, task_items, samples)
            self._collect(task_items, results)
            self._expire(task_items, results)
        return [r if r is not None else {"overall": self.fallback} for r in results]

    def _dispatch(self, pending: deque, task_items: dict, samples: list[dict]) -> None:
        for w in self._workers:
            if pending and w.ready and w.task is None:
                w.task = pending.popleft()
                w.deadline = time.monotonic() + self.timeout_s * len(task_items[w.task])
                w.conn.send((w.task, [samples[i] for i in task_items[w.task]]))

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        times = [w.deadline if w.task is not None else w.started + START_TIMEOUT_S
                 for w in self._workers if w.task is not None or not w.ready]
        return max(0.0, min(times) - now) if times else 0.0

    def _collect(self, task_items: dict, results: list) -> None:
        by_conn = {w.conn: w for w in self._workers}
        for conn in wait(list(by_conn), timeout=self._next_wakeup()):
            w = by_conn[conn]
            try:
                kind, task, payload = conn.recv()
            except (EOFError, OSError):
                if not w.ready:
                    self._start_failures += 1
                    if self._start_failures >= MAX_START_FAILURES:
                        raise RewardFunctionError(f"reward workers for {self.spec!r} keep dying while "
                                                  "starting (crash on import?)")
                self._fail(w, task_items, results, "crashes", "the worker process died")
                self._replace(w)
                continue
            if kind == "ready":
                w.ready = True
                self._start_failures = 0
            elif kind == "load_error":
                raise RewardFunctionError(f"reward worker could not load {self.spec!r}: {payload}")
            elif kind == "ok" and task == w.task:
                for i, result in zip(task_items[task], payload):
                    results[i] = result
                w.task = None
            elif kind == "error" and task == w.task:
                self._fail(w, task_items, results, "errors", payload)

    def _expire(self, task_items: dict, results: list) -> None:
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now >= w.deadline:
                self._fail(w, task_items, results, "timeouts", f"no result within {self.timeout_s} s per item")
                self._replace(w)
            elif not w.ready and w.task is None and now >= w.started + START_TIMEOUT_S:
                raise RewardFunctionError(f"reward worker for {self.spec!r} did not start in {START_TIMEOUT_S} s")

    def _fail(self, w: _Worker, task_items: dict, results: list, counter: str, why: str) -> None:
        if w.task is None:
            return
        items = task_items[w.task]
        self.counters[counter] += len(items)
        log.warning("reward scoring failed (%s) for %d sample(s); using fallback score %s\n"
                    "failing sample %s\n%s", counter, len(items), self.fallback,
                    describe_sample(items[0], self._samples[items[0]]), why)
        for i in items:
            results[i] = {"overall": self.fallback}
        w.task = None

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self._workers:
            w.process.join(timeout=2)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            w.conn.close()
        self._workers = []

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
