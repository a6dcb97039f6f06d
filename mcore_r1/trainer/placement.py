"""Ray placement: one bundle per device, one hybrid worker per bundle, ranks in node order.

The driver joins an existing Ray cluster when `RAY_ADDRESS` is set and starts a local one
otherwise. Before any worker starts, `check_fits` compares what the config asks for
(`trainer.nnodes x trainer.devices_per_node` GPUs, or CPU ranks on a CPU-only cluster) with
what the cluster's alive nodes offer, and fails with both numbers, so an impossible run never
half-starts.

One placement group holds every bundle (PACK: fill a node before the next). Ranks are given in
node order, so consecutive ranks - Megatron's TP groups and vLLM's TP replicas - share a node.
Rank 0's node provides the torch.distributed rendezvous address. Each worker gets RANK,
WORLD_SIZE and LOCAL_RANK; on GPU, Ray makes exactly one device visible to each worker, which
is therefore device 0 inside the process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from mcore_r1.config.schema import Config


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
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, runtime_env=env, log_to_driver=True,
                 configure_logging=False)


def alive_nodes() -> list[NodeResources]:
    import ray

    return [NodeResources(n["NodeID"], n["NodeManagerAddress"], n["Resources"].get("CPU", 0.0),
                          n["Resources"].get("GPU", 0.0))
            for n in ray.nodes() if n.get("Alive")]


class WorkerGroup:
    """The hybrid workers of one run, in rank order; `call` runs a method on all of them."""

    def __init__(self, cfg: Config, model_dir: str, use_gpu: bool):
        import ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from mcore_r1.workers.hybrid import HybridWorker

        t = cfg.trainer
        check_fits(t.nnodes, t.devices_per_node, alive_nodes(), use_gpu)
        self.world = t.nnodes * t.devices_per_node
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(self.world)], strategy="PACK")
        ray.get(self.pg.ready(), timeout=600)
        nodes = placement_group_table(self.pg)["bundles_to_node_id"]
        order = sorted(range(self.world), key=lambda b: (nodes[b], b))
        actor = ray.remote(HybridWorker)
        self.workers = []
        local_count: dict[str, int] = {}
        for rank, b in enumerate(order):
            local = local_count.get(nodes[b], 0)
            local_count[nodes[b]] = local + 1
            env = {"RANK": str(rank), "WORLD_SIZE": str(self.world),
                   "LOCAL_RANK": "0" if use_gpu else str(local), "MCORE_R1_RAY_WORKER": "1"}
            self.workers.append(actor.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=b),
            ).remote(cfg, model_dir, env, bundle["CPU"]))
        addr, port = ray.get(self.workers[0].rendezvous_address.remote())
        self.call("set_rendezvous", addr, port)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list:
        """`method(*args)` on every worker at once; results in rank order."""
        import ray

        return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def call_each(self, method: str, per_rank_args: Sequence[tuple]) -> list:
        """`method(*per_rank_args[r])` on worker r, all at once; results in rank order."""
        import ray

        return ray.get([getattr(w, method).remote(*a) for w, a in zip(self.workers, per_rank_args)])

    def shutdown(self, timeout_s: float = 120.0) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

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
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)


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
