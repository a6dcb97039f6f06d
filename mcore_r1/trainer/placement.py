"""Ray placement: one bundle per node, `devices_per_node` hybrid workers per bundle, ranks in node order.

The driver joins an existing Ray cluster when `RAY_ADDRESS` is set and starts a local one
otherwise. Before any worker starts, `check_fits` compares what the config asks for
(`trainer.nnodes x trainer.devices_per_node` GPUs, or CPU ranks on a CPU-only cluster) with
what the cluster's alive nodes offer, and fails with both numbers, so an impossible run never
half-starts.

One placement group holds one bundle of `devices_per_node` devices per node, STRICT_SPREAD: the
run occupies exactly `nnodes` distinct nodes with `devices_per_node` ranks each, as configured
(PACK would fold a 2 x 4 layout onto one 8-device node, silently changing what crosses the
network). Ranks are given node by node, so consecutive ranks - Megatron's TP groups and vLLM's
TP replicas - share a node. Rank 0's node provides the torch.distributed rendezvous address.
Each worker gets RANK, WORLD_SIZE and LOCAL_RANK; on GPU, Ray makes exactly one device visible
to each worker, which is therefore device 0 inside the process.

Failures stop the run, they never hang it: every call is awaited by `failures.wait_all`, which
ends as soon as any worker dies or raises (its peers would wait for it in a collective forever)
or when the call outlasts `trainer.worker_timeout_s`, with a `WorkerFailure` naming the rank, its
pid and node (recorded at start-up: `placement`, `write_placement`) and the method. `shutdown`
then kills the workers instead of asking stuck processes to close.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from mcore_r1.config.schema import Config
from mcore_r1.parallel.device import cpu_process_env
# WorkerFailure and WorkerTimeout are part of this module's interface (callers catch them here).
from mcore_r1.trainer.failures import WorkerFailure, WorkerTimeout, wait_all  # noqa: F401


PG_READY_S = 600.0  # how long the devices may take to become free for the run


class PlacementError(RuntimeError):
    """The configured layout cannot be placed on the Ray cluster; the message has the numbers."""


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    address: str
    cpus: float
    gpus: float


def check_fits(nnodes: int, devices_per_node: int, nodes: Sequence[NodeResources],
               use_gpu: bool) -> None:
    """Raise `PlacementError` unless `nnodes` alive nodes each offer `devices_per_node` devices."""
    kind = "GPU" if use_gpu else "CPU"
    have = [n.gpus if use_gpu else n.cpus for n in nodes]
    fitting = sum(1 for h in have if h >= devices_per_node)
    if fitting >= nnodes:
        return
    listing = ", ".join(f"{n.address}: {h:g} {kind}" for n, h in zip(nodes, have)) or "no alive nodes"
    raise PlacementError(
        f"cannot place trainer.nnodes x trainer.devices_per_node = {nnodes} x {devices_per_node} = "
        f"{nnodes * devices_per_node} {kind} workers: {fitting} of {len(nodes)} Ray node(s) have "
        f"{devices_per_node} {kind} ({listing}). Lower trainer.devices_per_node/nnodes or add nodes "
        "(RAY_ADDRESS joins an existing cluster)")


def start_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # vLLM's per-request INFO lines would bury the step lines; VLLM_LOGGING_LEVEL=INFO restores them.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env = {"env_vars": {k: v for k, v in os.environ.items()
                        if k.startswith(("MCORE_R1_", "VLLM_", "HF_", "TRANSFORMERS_"))}}
    env["env_vars"].update(cpu_process_env())  # read at process start: pass it to the workers
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, runtime_env=env, log_to_driver=True,
                 configure_logging=False)


def worker_threads(nodes: list[NodeResources], used: set[str], per_node: int, use_gpu: bool) -> int:
    """Torch threads per CPU worker: the cores of the smallest node used, shared by its workers
    (one worker alone on a 2-core machine computes with both). GPU workers compute on their GPU
    and keep one."""
    if use_gpu:
        return 1
    cores = [n.cpus for n in nodes if n.node_id in used] or [per_node]
    return max(1, int(min(cores)) // per_node)


def alive_nodes() -> list[NodeResources]:
    import ray

    return [NodeResources(n["NodeID"], n["NodeManagerAddress"], n["Resources"].get("CPU", 0.0),
                          n["Resources"].get("GPU", 0.0))
            for n in ray.nodes() if n.get("Alive")]


class WorkerGroup:
    """The hybrid workers of one run, in rank order; `call` runs a method on all of them."""

    def __init__(self, cfg: Config, model_dir: str, use_gpu: bool):
        import ray
        from ray.util.placement_group import (placement_group, placement_group_table,
                                              remove_placement_group)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from mcore_r1.workers.hybrid import HybridWorker

        t = cfg.trainer
        check_fits(t.nnodes, t.devices_per_node, alive_nodes(), use_gpu)
        world, per_node = t.nnodes * t.devices_per_node, t.devices_per_node
        node_bundle = {"GPU": per_node, "CPU": per_node} if use_gpu else {"CPU": per_node}
        pg = placement_group([dict(node_bundle) for _ in range(t.nnodes)], strategy="STRICT_SPREAD")
        try:
            ray.get(pg.ready(), timeout=PG_READY_S)
        except ray.exceptions.GetTimeoutError:
            # check_fits saw the nodes' totals; the devices may still be held by another job.
            remove_placement_group(pg)
            raise PlacementError(
                f"{t.nnodes} node(s) with {per_node} free {'GPU' if use_gpu else 'CPU'} each did not "
                f"become available within {PG_READY_S:g} s; is another job holding them? "
                "(`ray status` shows the usage)") from None
        nodes = placement_group_table(pg)["bundles_to_node_id"]
        threads = worker_threads(alive_nodes(), set(nodes.values()), per_node, use_gpu)
        actor = ray.remote(HybridWorker)
        workers = []
        for rank in range(world):
            node, local = divmod(rank, per_node)
            env = {"RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_RANK": "0" if use_gpu else str(local), "MCORE_R1_RAY_WORKER": "1"}
            workers.append(actor.options(
                num_cpus=1, num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=node),
            ).remote(cfg, model_dir, env, threads))
        ips = {n.node_id: n.address for n in alive_nodes()}
        try:
            self._adopt(workers, "HybridWorker", t.worker_timeout_s, pg,
                        [nodes[rank // per_node] for rank in range(world)], ips)
            addr, port = self._wait([self.workers[0].rendezvous_address.remote()],
                                    "rendezvous_address", ranks=[0])[0]
            self.call("set_rendezvous", addr, port)
        except BaseException:
            # The caller gets no group to shut down: release the actors and the bundles here.
            self.failure = self.failure or WorkerFailure("start-up failed")
            self.shutdown()
            raise

    @classmethod
    def from_actors(cls, actors: Sequence[Any], name: str, timeout_s: float) -> "WorkerGroup":
        """A group of already created Ray actors (no placement group): for tests."""
        group = cls.__new__(cls)
        group._adopt(list(actors), name, timeout_s, None, [None] * len(actors), {})
        return group

    def _adopt(self, workers: list, name: str, timeout_s: float, pg: Any,
               node_ids: Sequence[Optional[str]], ips: dict) -> None:
        """Take the actors as ranks 0..n-1 and record where each one runs (waits for them to start)."""
        self.workers, self.name, self.timeout_s, self.pg = workers, name, timeout_s, pg
        self.world = len(workers)
        self.failure: Optional[WorkerFailure] = None
        # Known before the actors answer, so a worker that dies while starting is still named.
        self.placement: list[dict] = [{"rank": r, "node_id": n, "node_ip": ips.get(n), "pid": None}
                                      for r, n in enumerate(node_ids)]
        # `__ray_call__` runs a function on the actor's process without a dedicated method.
        located = self._wait([w.__ray_call__.remote(_whereabouts) for w in workers], "start-up")
        for entry, where in zip(self.placement, located):
            entry.update(where)

    # -- calls --------------------------------------------------------------------------------

    def call(self, method: str, *args: Any, **kwargs: Any) -> list:
        """`method(*args)` on every worker at once; results in rank order."""
        self._check_usable(method)
        return self._wait([getattr(w, method).remote(*args, **kwargs) for w in self.workers], method)

    def call_each(self, method: str, per_rank_args: Sequence[tuple]) -> list:
        """`method(*per_rank_args[r])` on worker r, all at once; results in rank order."""
        self._check_usable(method)
        return self._wait([getattr(w, method).remote(*a) for w, a in zip(self.workers, per_rank_args)],
                          method)

    def _check_usable(self, method: str) -> None:
        # After a failure the surviving workers sit in a collective that will never complete; a
        # new call would queue behind it (or enter a collective alone) and wait for the timeout.
        if self.failure is not None:
            raise self.failure.with_context(f"not calling {self.name}.{method}: the workers failed earlier")

    def _wait(self, refs: list, method: str, ranks: Optional[Sequence[int]] = None) -> list:
        try:
            return wait_all(refs, ranks, method, self.name, self.placement, self.timeout_s)
        except BaseException as err:
            # Also an interrupt (second Ctrl-C): the workers are mid-call, so shutdown must kill.
            self.failure = err if isinstance(err, WorkerFailure) else WorkerFailure(
                f"call to {self.name}.{method} interrupted ({type(err).__name__})", method=method)
            raise

    # -- where the workers run ------------------------------------------------------------------

    def describe_placement(self) -> str:
        """One line per rank: node address and id, pid."""
        return "\n".join(f"rank {p['rank']}: node {p['node_ip']} ({(p['node_id'] or '?')[:12]}), "
                         f"pid {p['pid']}" for p in self.placement)

    def write_placement(self, path: os.PathLike) -> None:
        """The placement as JSON (`{"world", "nodes", "ranks": [{rank, node_id, node_ip, pid}]}`),
        written atomically so a reader never sees half a file."""
        from mcore_r1.files import write_atomic

        write_atomic(Path(path), json.dumps({"world": self.world,
                                             "nodes": len({p["node_id"] for p in self.placement}),
                                             "ranks": self.placement}, indent=1) + "\n")

    # -- shutdown -------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 120.0) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.failure is None:
            try:
                ray.get([w.close.remote() for w in self.workers], timeout=timeout_s)
                # Let the processes exit normally rather than be killed: vLLM's CPU shared-memory
                # communicator (rollout.tp > 1) removes its /dev/shm segments only on a normal exit,
                # and a leftover segment makes the next run's engine fail with errno 17.
                for w in self.workers:
                    w.__ray_terminate__.remote()
                _wait_until_dead(self.workers, timeout_s)
            except Exception as err:  # noqa: BLE001 - shutting down anyway; say why
                print(f"mcore_r1: workers did not close cleanly: {err}", flush=True)
        # After a failure the survivors are stuck in collectives and would never answer `close`:
        # kill them straight away (bounded; may leave vLLM /dev/shm segments with rollout.tp > 1).
        for w in self.workers:
            ray.kill(w)
        if self.pg is not None:
            remove_placement_group(self.pg)


def _whereabouts(_worker: Any) -> dict:
    """Run inside a worker (via `__ray_call__`): the node and process it lives in."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


def _wait_until_dead(actors: Sequence[Any], timeout_s: float) -> None:
    """Wait for terminated actors to exit (a call on a dead actor raises)."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    for actor in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=1)
            except Exception:  # noqa: BLE001 - RayActorError: it has exited
                break
            time.sleep(0.2)


def first_of(results: Sequence[Optional[Any]]) -> Any:
    """The one non-None result of a call whose answer comes from a single rank."""
    found = [r for r in results if r is not None]
    if not found:
        raise RuntimeError("no worker returned a result")
    return found[0]
