"""Refit: move the trained Megatron weights into the colocated vLLM engine, in memory.

Everything about layouts comes from the one HF <-> Megatron mapping (`models.mapping`):
Megatron shards are turned into HF-named tensors and handed to vLLM's in-place reload, whose
own loaders fuse q/k/v and gate/up and slice for vLLM's TP rank.

General path (any training TP x PP, any rollout TP that divides the world):
  1. Each stage lists the HF tensors it will produce (names, shapes, dtypes). The shapes come
     from running the mapping's transforms on *meta* tensors, so no data moves. With PP > 1 the
     stages swap their lists (`all_gather_object` over the PP group). The lists are rebuilt on
     every refit: nothing is cached between refits, so a changed model can never be moved with
     stale metadata.
  2. Before vLLM is touched, every name and shape is checked against the checkpoint vLLM was
     built from, and every Megatron parameter must have a rule. A bad name or shape raises
     `RefitError` naming the tensor, with the engine still holding its previous weights.
  3. Tensors are grouped into buckets of at most `bucket_bytes`. Stage by stage, the owning
     stage converts its shards with the mapping's `export_hf_weights`, whose TP gather runs
     one exchange per bucket of shards (`BucketedTPGather`: through shared memory when the
     TP ranks share a CPU host, else one all-gather), packs each bucket of HF
     tensors into one flat buffer and broadcasts it over the PP group; every rank unpacks
     views and streams them into vLLM. Peak extra memory is about TP x one bucket of shards
     plus one bucket of HF tensors.

Zero-gather path (rollout TP == training TP, PP == 1): each rank converts its own Megatron
shard into its block of every HF tensor (`models.mapping.export_hf_shards`: q/k/v regrouped,
gate/up split, vocab padding cut) and hands the blocks to vLLM's reload in "local shards" mode
(see `rollout.colocated`). No collective runs. It needs vLLM's vocabulary rows per rank to be
Megatron's (true when the vocabulary divides evenly, e.g. Qwen's 151936 at TP 2/4/8) and a
per-shard conversion for every sharded rule; otherwise `refit(path="auto")` takes the general
path and says why in the metrics.

The whole refit is one call into vLLM's reload (a lazy iterator), because its layerwise reload
rebuilds a layer only once all of that layer's tensors have arrived: splitting a refit into
several reload calls would rebuild layers from partial data.

If anything fails after vLLM's reload has started, the engine may hold a mix of old and new
weights; `RefitError` then says so explicitly ("engine weights are now inconsistent").
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from mcore_r1.models.mapping import (
    Rule, bind_rules, export_hf_shards, export_hf_weights, unmapped_parameters,
)

DEFAULT_BUCKET_BYTES = 256 << 20


class RefitError(RuntimeError):
    """The refit could not run or did not finish; the message names the tensor."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stage: int

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class RefitMetrics:
    seconds: float
    bytes: int           # bytes of HF tensors handed to vLLM on this rank
    tensors: int
    buckets: int
    path: str            # "general" or "zero_gather"
    note: str = ""       # why "auto" did not take the zero-gather path
    tp_collectives: int = 0  # TP exchanges (one per bucket of shards)

    def as_dict(self, prefix: str = "refit/") -> dict[str, float]:
        return {f"{prefix}seconds": self.seconds, f"{prefix}bytes": float(self.bytes),
                f"{prefix}tensors": float(self.tensors), f"{prefix}buckets": float(self.buckets),
                f"{prefix}tp_collectives": float(self.tp_collectives)}


@dataclass
class RefitSource:
    """What the refit reads on this rank: the Megatron stage and its rules."""

    model: torch.nn.Module
    rules: Sequence[Rule]
    layer_prefixes: dict
    skip: Callable[[Rule], bool]     # duplicates (tied head) and frozen modules
    tp_group: Optional[object] = None
    pp_group: Optional[object] = None
    # the shared-memory exchange of the general path (TP x one bucket of /dev/shm per TP
    # group), kept between refits: a fresh mapping would fault its pages in on every refit
    exchange: Optional[object] = None

    @classmethod
    def from_megatron(cls, model, hf: dict, tp: int, frozen: Sequence[str] = ()) -> "RefitSource":
        """`frozen`: Megatron name prefixes never resent (e.g. ``vision_model.``)."""
        from megatron.core import parallel_state as mpu

        from mcore_r1.models.builder import export_skip, layer_tables, weight_rules

        dup = export_skip(hf)
        frozen = tuple(frozen)
        return cls(model, weight_rules(hf, tp), layer_tables(model),
                   lambda rule: dup(rule) or (bool(frozen) and rule.mcore.startswith(frozen)),
                   mpu.get_tensor_model_parallel_group(), mpu.get_pipeline_model_parallel_group())


# -- planning -------------------------------------------------------------------------------


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _group_rank(group) -> int:
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def stage_manifest(src: RefitSource) -> list[TensorSpec]:
    """This stage's HF tensors, in export order, computed on meta tensors (no data moves)."""
    check_rules_cover(src)
    tp = _group_size(src.tp_group)
    stage = _group_rank(src.pp_group)

    def meta_gather(shard: torch.Tensor) -> list[torch.Tensor]:
        return [torch.empty_like(shard, device="meta")] * tp

    return [TensorSpec(name, tuple(t.shape), t.dtype, stage) for name, t in export_hf_weights(
        src.model, src.rules, meta_gather, src.layer_prefixes, src.skip)]


def check_rules_cover(src: RefitSource) -> None:
    bindings = bind_rules(src.model, src.rules, src.layer_prefixes)
    missing = unmapped_parameters(src.model, bindings)
    if missing:
        raise RefitError(f"no mapping rule for Megatron parameter(s) {', '.join(missing[:8])}: "
                         "refusing to refit (vLLM was not touched)")


def full_manifest(src: RefitSource) -> list[TensorSpec]:
    """Every stage's manifest, in stage order, identical on all ranks."""
    mine = stage_manifest(src)
    if _group_size(src.pp_group) == 1:
        return mine
    gathered: list = [None] * _group_size(src.pp_group)
    dist.all_gather_object(gathered, mine, group=src.pp_group)
    return [spec for stage in gathered for spec in stage]


def plan_buckets(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors of one stage, at most `bucket_bytes` each (a bigger tensor alone)."""
    buckets: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        current = buckets[-1] if buckets else None
        if (current is None or current[0].stage != spec.stage or current[0].dtype != spec.dtype
                or size + spec.nbytes > bucket_bytes):
            buckets.append([spec])
            size = spec.nbytes
        else:
            current.append(spec)
            size += spec.nbytes
    return buckets


# -- validation against the engine's checkpoint ----------------------------------------------


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of the checkpoint the engine was started from (headers only).
    VL checkpoints nested under ``model.language_model.`` / ``model.visual.`` are listed under
    the hub names the rules use."""
    from safetensors import safe_open

    from mcore_r1.models.hf_checkpoint import HFCheckpointReader

    reader = HFCheckpointReader(model_dir)
    shapes = {}
    for name, file in reader.weight_map.items():
        with safe_open(Path(model_dir) / file, "pt") as f:
            shapes[name] = tuple(f.get_slice(name).get_shape())
    for alias_from, alias in reversed(HFCheckpointReader.ALIASES):
        for name in list(shapes):
            if name.startswith(alias):
                shapes.setdefault(alias_from + name[len(alias):], shapes[name])
    return shapes


def validate_manifest(specs: Sequence[TensorSpec], expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor must be one vLLM knows, with the shape it expects; no name twice."""
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise RefitError(f"{spec.name}: produced twice by the mapping (vLLM was not touched)")
        seen.add(spec.name)
        if spec.name not in expected:
            raise RefitError(f"{spec.name}: not a tensor of the rollout model's checkpoint "
                             "(vLLM was not touched)")
        if tuple(spec.shape) != tuple(expected[spec.name]):
            raise RefitError(f"{spec.name}: refit tensor has shape {tuple(spec.shape)} but vLLM "
                             f"expects {tuple(expected[spec.name])} (vLLM was not touched)")


# -- transfer -------------------------------------------------------------------------------


class BucketedTPGather:
    """The `gather_tp` of `export_hf_weights`, one exchange per bucket instead of per tensor.

    `export_hf_weights` asks for one TP shard at a time, in binding order. That order is known
    in advance (the TP-sharded bindings that are not skipped), so the shards are cut into
    buckets of up to `bucket_bytes` (of local shard bytes) up front; when a bucket's first
    shard is asked for, the whole bucket is gathered at once and later requests are served
    from that result. A request out of the expected order raises instead of returning another
    tensor's data.

    On CPU, when the TP ranks share a host, no collective moves the bytes: every rank writes
    its shards straight into their places in the full tensors, in shared memory
    (`parallel.shm_gather`), and the full tensors are read in place (no merge copy). They are
    valid until the next bucket is exchanged; a consumer that keeps loaded tensors longer
    (vLLM's layerwise reload) gets copies (`keeps_tensors`). Elsewhere one all-gather (gloo or
    NCCL) per bucket returns the shards, which the mapping merges.
    """

    def __init__(self, src: "RefitSource", bucket_bytes: int, keeps_tensors: bool = True):
        state = src.model.state_dict(keep_vars=True)
        shards = [(b.rule, state[b.local_name].detach())
                  for b in bind_rules(src.model, src.rules, src.layer_prefixes)
                  if b.rule.tp_dim is not None and not src.skip(b.rule)]
        self.pending = deque(_cut(shards, bucket_bytes))
        self.ready: deque = deque()
        self.group, self.size = src.tp_group, _group_size(src.tp_group)
        self.rank, self.keeps_tensors = _group_rank(src.tp_group), keeps_tensors
        self.collectives = 0
        self.shared = None
        if self.size > 1 and shards and shards[0][1].device.type == "cpu":
            from mcore_r1.parallel.shm_gather import NodeLocalExchange

            need = self.size * max(sum(t.numel() * t.element_size() for _, t in b)
                                   for b in self.pending)
            kept = src.exchange
            if kept is None or kept.buffer.numel() < need:  # same on every rank: collective
                src.exchange = kept = NodeLocalExchange.create(self.group, need)
            self.shared = kept

    def __call__(self, shard: torch.Tensor) -> "list[torch.Tensor] | torch.Tensor":
        if self.size == 1:
            return [shard]
        if not self.ready:
            self._gather_next_bucket()
        expected, gathered = self.ready.popleft()
        if expected.data_ptr() != shard.data_ptr() or expected.shape != shard.shape:
            raise RefitError(f"TP gather out of order: asked for a {tuple(shard.shape)} shard, "
                             f"planned {tuple(expected.shape)}")
        return gathered

    def _gather_next_bucket(self) -> None:
        if not self.pending:
            raise RefitError("TP gather asked for more shards than the model holds")
        batch = self.pending.popleft()
        self.collectives += 1
        if self.shared is not None:
            for (_, shard), full in zip(batch, self._exchange_full(batch)):
                self.ready.append((shard, full.clone() if self.keeps_tensors else full))
            return
        flat = torch.cat([t.reshape(-1) for _, t in batch])
        out = torch.empty(self.size * flat.numel(), dtype=flat.dtype)
        dist.all_gather_into_tensor(out, flat, group=self.group)
        per_rank, offset = out.view(self.size, -1), 0
        for _, t in batch:
            n = t.numel()
            self.ready.append((t, [per_rank[r, offset:offset + n].view(t.shape)
                                   for r in range(self.size)]))
            offset += n

    def _exchange_full(self, batch) -> list[torch.Tensor]:
        """Full Megatron tensors of the bucket, each rank writing its shards in place."""
        dtype = batch[0][1].dtype
        nbytes = self.size * sum(t.numel() * t.element_size() for _, t in batch)

        def full_views(buffer: torch.Tensor) -> list[torch.Tensor]:
            region, offset, views = buffer[:nbytes].view(dtype), 0, []
            for rule, shard in batch:
                shape = list(shard.shape)
                shape[rule.tp_dim] *= self.size
                views.append(region[offset:offset + shard.numel() * self.size].view(shape))
                offset += shard.numel() * self.size
            return views

        def fill(buffer: torch.Tensor) -> None:
            for (rule, shard), full in zip(batch, full_views(buffer)):
                rule.write_shard(full, shard, self.rank, self.size)

        return full_views(self.shared.exchange(fill))


def _cut(shards, bucket_bytes: int) -> list[list]:
    """Consecutive (rule, shard) pairs of one dtype, at most `bucket_bytes` of shards each (a
    bigger shard alone)."""
    buckets: list[list] = []
    size = 0
    for rule, t in shards:
        nbytes = t.numel() * t.element_size()
        if buckets and size + nbytes <= bucket_bytes and t.dtype == buckets[-1][0][1].dtype:
            buckets[-1].append((rule, t))
            size += nbytes
        else:
            buckets.append([(rule, t)])
            size = nbytes
    return buckets


def _unpack(flat: torch.Tensor, bucket: Sequence[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for spec in bucket:
        n = int(torch.Size(spec.shape).numel())
        yield spec.name, flat[offset:offset + n].view(spec.shape)
        offset += n


def stream_general(src: RefitSource, buckets: Sequence[Sequence[TensorSpec]],
                   stats: dict, bucket_bytes: int,
                   keeps_tensors: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for the whole model on every rank, bucket by bucket.
    `keeps_tensors`: the consumer holds on to tensors after the next one is asked for."""
    pp, my_stage = _group_size(src.pp_group), _group_rank(src.pp_group)
    gather = BucketedTPGather(src, bucket_bytes, keeps_tensors)
    exported = export_hf_weights(src.model, src.rules, gather, src.layer_prefixes, src.skip)
    for bucket in buckets:
        stage = bucket[0].stage
        if pp == 1:
            for spec in bucket:
                name, tensor = next(exported)
                _check_same(spec, name, tensor)
                stats["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor
            stats["buckets"] += 1
            continue
        numel = sum(int(torch.Size(s.shape).numel()) for s in bucket)
        # a fresh buffer per bucket: vLLM keeps views of loaded tensors until a layer completes
        flat = torch.empty(numel, dtype=bucket[0].dtype)
        if stage == my_stage:
            offset = 0
            for spec in bucket:
                name, tensor = next(exported)
                _check_same(spec, name, tensor)
                flat[offset:offset + tensor.numel()].copy_(tensor.reshape(-1))
                offset += tensor.numel()
        dist.broadcast(flat, group=src.pp_group,
                       src=dist.get_global_rank(src.pp_group, stage))
        stats["buckets"] += 1
        stats["bytes"] += flat.numel() * flat.element_size()
        yield from _unpack(flat, bucket)
    stats["tp_collectives"] = gather.collectives


def _check_same(spec: TensorSpec, name: str, tensor: torch.Tensor) -> None:
    if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise RefitError(f"{name}: exported {tuple(tensor.shape)} {tensor.dtype} but the plan "
                         f"expected {spec.name} {spec.shape} {spec.dtype}")


def zero_gather_problem(engine, src: RefitSource) -> Optional[str]:
    """None when this rank can refit without communication, else the reason it cannot."""
    tp, pp = _group_size(src.tp_group), _group_size(src.pp_group)
    if pp != 1 or engine.rollout_tp != tp:
        return f"needs rollout TP == training TP and PP == 1 (have {engine.rollout_tp}, {tp}x{pp})"
    if tp == 1:
        return "TP 1: the general path moves nothing between ranks either"
    for binding in bind_rules(src.model, src.rules, src.layer_prefixes):
        rule = binding.rule
        if rule.tp_dim is not None and rule.transform.to_hf_shard is None and not src.skip(rule):
            return f"{binding.local_name}: no per-shard conversion for {rule.transform.kind!r}"
    rank = _group_rank(src.tp_group)
    if engine.rank % engine.rollout_tp != rank:  # vLLM's TP rank must be Megatron's
        return f"vLLM TP rank {engine.rank % engine.rollout_tp} != Megatron TP rank {rank}"
    state = src.model.state_dict(keep_vars=True)
    for binding in bind_rules(src.model, src.rules, src.layer_prefixes):
        if binding.rule.transform.kind != "vocab" or src.skip(binding.rule):
            continue
        rows = state[binding.local_name].shape[0]
        real = binding.rule.shard_to_hf(torch.empty(rows, 0), rank, tp)[0].shape[0]
        megatron_rows = (rank * rows, rank * rows + real)
        for module, vllm_rows in engine.vocab_rows().items():
            if tuple(vllm_rows) != megatron_rows:
                return (f"{module}: vLLM holds vocab rows {vllm_rows} on TP rank {rank}, "
                        f"Megatron {megatron_rows}")
    return None


def stream_local(src: RefitSource, stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
    tp, rank = _group_size(src.tp_group), _group_rank(src.tp_group)
    for name, block in export_hf_shards(src.model, src.rules, rank, tp, src.layer_prefixes,
                                        src.skip):
        stats["bytes"] += block.numel() * block.element_size()
        yield name, block


# -- entry point ----------------------------------------------------------------------------


def refit(engine, src: RefitSource, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
          expected: Optional[dict[str, tuple[int, ...]]] = None, path: str = "auto") -> RefitMetrics:
    """Copy this rank's Megatron weights into `engine` (a `ColocatedEngine`) in place.

    `path`: "auto" (zero-gather when possible), "general" or "zero_gather" (an error when not
    possible). Collective: every training rank must call it. Returns this rank's metrics.
    """
    if path not in ("auto", "general", "zero_gather"):
        raise ValueError(f"refit path {path!r}: expected auto, general or zero_gather")
    start = time.perf_counter()
    specs = full_manifest(src)
    if expected is None:  # the engine's checkpoint never changes: read its headers once
        if getattr(engine, "checkpoint_shapes", None) is None:
            engine.checkpoint_shapes = checkpoint_shapes(engine.model_dir)
        expected = engine.checkpoint_shapes
    validate_manifest(specs, expected)
    problem = zero_gather_problem(engine, src) if path != "general" else "general path requested"
    if problem is not None and path == "zero_gather":
        raise RefitError(f"zero-gather refit not possible: {problem} (vLLM was not touched)")
    local = problem is None
    buckets = [] if local else plan_buckets(specs, bucket_bytes)
    stats = {"bytes": 0, "buckets": 0}
    # vLLM's own loaders copy each tensor as it arrives; its layerwise reload keeps them
    keeps = not getattr(engine, "plain_weights", False)
    stream = (stream_local(src, stats) if local
              else stream_general(src, buckets, stats, bucket_bytes, keeps))
    try:
        with torch.no_grad():
            consumed = engine.reload(stream, local_shards=local)
    except Exception as err:  # noqa: BLE001 - whatever broke, vLLM is now partly reloaded
        raise RefitError(f"{err} -- refit aborted midway: engine weights are now inconsistent "
                         "(refit again before generating)") from err
    if consumed != len(specs):
        raise RefitError(f"vLLM consumed {consumed} of {len(specs)} tensors: engine weights "
                         "are now inconsistent (refit again before generating)")
    return RefitMetrics(time.perf_counter() - start, stats["bytes"], len(specs),
                        stats["buckets"], "zero_gather" if local else "general",
                        "" if local or path == "general" else problem,
                        stats.get("tp_collectives", 0))
