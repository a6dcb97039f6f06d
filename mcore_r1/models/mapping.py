"""HF <-> Megatron-Core weight mapping: the one place that knows how tensors correspond.

A family's mapping is a list of declarative `Rule`s: one Megatron parameter name, the HF
tensor names it is made of, the transform between the two layouts, and how the Megatron
tensor is cut over tensor parallelism. Names may contain `{layer}` (the *global* layer index).

Three views of every Megatron parameter exist, and the code keeps them apart:
  HF tensors  <-(transform)->  full Megatron tensor (TP=1)  <-(TP split)->  this rank's shard

The converter (`tools/convert_hf_mcore.py`), the logit checks and the refit into vLLM all go
through `load_hf_weights` / `export_hf_weights` below; nothing else encodes the layouts.

Transforms:
  copy     the same tensor
  qkv      q, k, v (weights or biases) -> Megatron's fused `linear_qkv`, grouped per query
           group: [q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]; a TP
           split of dim 0 then hands each rank whole query groups
  gate_up  gate, up -> `linear_fc1` = [gate; up]; each TP rank holds [gate_r; up_r]
  vocab    embedding / output rows padded with zeros to a size divisible by TP

Each transform can also turn one TP rank's Megatron shard straight into that rank's
contiguous block of every HF tensor (`to_hf_shard`), the layout tensor-parallel inference
engines load; `export_hf_shards` uses it so a rank can hand over its weights without gathering.
The other way, `fill_shard` copies each HF tensor's piece straight into this rank's shard, so
loading a checkpoint copies every byte once (`Rule.fill`; the same result as
`split(to_mcore(...))`, which stays the definition). Where a shard is HF tensors stored
unchanged (copy, gate_up, unpadded vocab), `pieces` names those views; filling copies them, and
the converter writes them to the new checkpoint without copying them into the model at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch


class MappingError(ValueError):
    """Weights that do not fit the model: names the tensor and the shapes involved."""


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Smallest size >= vocab_size divisible by TP (padding rows never reach HF files)."""
    return math.ceil(vocab_size / tp) * tp


@dataclass(frozen=True)
class Transform:
    """A layout change between HF tensors and one full (unsharded) Megatron tensor."""

    kind: str
    to_mcore: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]
    # (shard, tp_rank, tp) -> this rank's contiguous block of each HF tensor, split along the
    # rule's TP dimension; None when no such local conversion exists
    to_hf_shard: Optional[Callable[[torch.Tensor, int, int], list[torch.Tensor]]] = None
    # (target shard, HF tensors, tp_rank, tp, tp_dim): copy this rank's piece of
    # `to_mcore(sources)` into `target` straight from the sources, without building the full
    # tensor; None falls back to building it
    fill_shard: Optional[Callable[[torch.Tensor, Sequence[torch.Tensor], int, int, int], None]] = None
    # (HF tensors, tp_rank, tp, tp_dim): this rank's piece of `to_mcore(sources)` as views of
    # the sources, stacked along dim 0, when it is made of them unchanged; None when it is not
    # (interleaved, padded). Loading copies the views; a converter can write them directly.
    pieces: Optional[Callable[[Sequence[torch.Tensor], int, int, int],
                              Optional[list[torch.Tensor]]]] = None


def copy_transform() -> Transform:
    def pieces(ts, rank, tp, dim):
        return [ts[0].chunk(tp, dim=dim)[rank] if tp > 1 else ts[0]]

    return Transform("copy", lambda ts: ts[0], lambda t: [t], lambda t, rank, tp: [t],
                     pieces=pieces)


def qkv_transform(num_heads: int, num_groups: int, head_dim: int) -> Transform:
    per_group = num_heads // num_groups

    def to_mcore(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        q, k, v = ts
        rest = q.shape[1:]  # (hidden,) for weights, () for biases
        parts = [
            q.reshape(num_groups, per_group * head_dim, *rest),
            k.reshape(num_groups, head_dim, *rest),
            v.reshape(num_groups, head_dim, *rest),
        ]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def to_hf(t: torch.Tensor) -> list[torch.Tensor]:
        rest = t.shape[1:]
        grouped = t.reshape(num_groups, (per_group + 2) * head_dim, *rest)
        q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]

    def to_hf_shard(shard: torch.Tensor, rank: int, tp: int) -> list[torch.Tensor]:
        # a TP shard holds whole query groups, so it is the same layout with fewer groups
        return qkv_transform(num_heads // tp, num_groups // tp, head_dim).to_hf(shard)

    def fill_shard(target, ts, rank, tp, dim):
        q, k, v = ts
        rest, local = q.shape[1:], num_groups // tp
        groups = slice(rank * local, (rank + 1) * local)
        dst = target.view(local, (per_group + 2) * head_dim, *rest)
        q_rows = per_group * head_dim
        dst[:, :q_rows].copy_(q.reshape(num_groups, q_rows, *rest)[groups])
        dst[:, q_rows:q_rows + head_dim].copy_(k.reshape(num_groups, head_dim, *rest)[groups])
        dst[:, q_rows + head_dim:].copy_(v.reshape(num_groups, head_dim, *rest)[groups])

    return Transform("qkv", to_mcore, to_hf, to_hf_shard, fill_shard)


def gate_up_transform() -> Transform:
    def to_hf(t: torch.Tensor) -> list[torch.Tensor]:
        return [x.contiguous() for x in t.chunk(2, dim=0)]

    def pieces(ts, rank, tp, dim):
        return [source.chunk(tp, dim=0)[rank] for source in ts]

    # a TP shard is [gate_r; up_r] (see Rule.split)
    return Transform("gate_up", lambda ts: torch.cat([ts[0], ts[1]], dim=0), to_hf,
                     lambda t, rank, tp: to_hf(t), pieces=pieces)


def vocab_transform(vocab_size: int, padded_size: int) -> Transform:
    def to_mcore(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        t = ts[0]
        if t.shape[0] == padded_size:
            return t
        pad = t.new_zeros(padded_size - t.shape[0], *t.shape[1:])
        return torch.cat([t, pad], dim=0)

    def to_hf_shard(shard: torch.Tensor, rank: int, tp: int) -> list[torch.Tensor]:
        rows = shard.shape[0]  # padding rows sit at the end of the last shards
        return [shard[:max(0, min(rows, vocab_size - rank * rows))]]

    def fill_shard(target, ts, rank, tp, dim):
        rows = target.shape[0]
        real = max(0, min(rows, ts[0].shape[0] - rank * rows))
        target[:real].copy_(ts[0][rank * rows:rank * rows + real])
        target[real:].zero_()

    def pieces(ts, rank, tp, dim):
        rows = padded_size // tp
        if ts[0].shape[0] != padded_size:  # padding rows exist only in the Megatron tensor
            return None
        return [ts[0][rank * rows:(rank + 1) * rows]]

    return Transform("vocab", to_mcore, lambda t: [t[:vocab_size].contiguous()], to_hf_shard,
                     fill_shard, pieces)


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensors it is made from."""

    mcore: str
    hf: tuple[str, ...]
    transform: Transform
    tp_dim: Optional[int] = None  # None: replicated over TP

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.mcore

    def split(self, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
        """This TP rank's piece of the full Megatron tensor."""
        if self.tp_dim is None or tp == 1:
            return full
        if self.transform.kind == "gate_up":
            gate, up = full.chunk(2, dim=0)
            return torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]], dim=0)
        return full.chunk(tp, dim=self.tp_dim)[tp_rank]

    def stored_pieces(self, sources: Sequence[torch.Tensor], tp_rank: int,
                      tp: int) -> Optional[list[torch.Tensor]]:
        """This rank's shard as views of `sources` (concatenated along dim 0), or None when
        the transform changes the bytes or their order."""
        if self.transform.pieces is None:
            return None
        if self.tp_dim is None:
            tp_rank, tp = 0, 1
        return self.transform.pieces(sources, tp_rank, tp, self.tp_dim)

    def fill(self, target: torch.Tensor, sources: Sequence[torch.Tensor], tp_rank: int,
             tp: int) -> None:
        """`target.copy_(self.split(self.transform.to_mcore(sources), tp_rank, tp))`, copying
        each source byte once (the caller has checked the shapes)."""
        pieces = self.stored_pieces(sources, tp_rank, tp)
        if pieces is not None:
            copy_pieces(target, pieces)
            return
        if self.tp_dim is None:
            tp_rank, tp = 0, 1
        if self.transform.fill_shard is None:
            target.copy_(self.split(self.transform.to_mcore(sources), tp_rank, tp))
        else:
            self.transform.fill_shard(target, sources, tp_rank, tp, self.tp_dim)

    def merge(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of `split`: the full Megatron tensor from all TP ranks' pieces (rank order)."""
        if self.tp_dim is None or len(shards) == 1:
            return shards[0]
        if self.transform.kind == "gate_up":
            gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
            return torch.cat([*gates, *ups], dim=0)
        return torch.cat(list(shards), dim=self.tp_dim)

    def write_shard(self, full: torch.Tensor, shard: torch.Tensor, tp_rank: int, tp: int) -> None:
        """Copy one TP rank's piece into its place in the full Megatron tensor: `merge` done
        in place, one rank at a time (so ranks sharing memory can each write their own)."""
        if self.transform.kind == "gate_up":
            for full_half, shard_half in zip(full.chunk(2, dim=0), shard.chunk(2, dim=0)):
                full_half.chunk(tp, dim=0)[tp_rank].copy_(shard_half)
        else:
            full.chunk(tp, dim=self.tp_dim)[tp_rank].copy_(shard)

    def shard_to_hf(self, shard: torch.Tensor, tp_rank: int, tp: int) -> list[torch.Tensor]:
        """This TP rank's block of each HF tensor (the whole tensor when replicated)."""
        if self.tp_dim is None or tp == 1:
            return self.transform.to_hf(shard)
        if self.transform.to_hf_shard is None:
            raise MappingError(f"{self.mcore}: transform {self.transform.kind!r} has no "
                               "per-shard HF conversion; gather over TP instead")
        return self.transform.to_hf_shard(shard, tp_rank, tp)


def copy_pieces(target: torch.Tensor, pieces: Sequence[torch.Tensor]) -> None:
    """`target.copy_(torch.cat(pieces))` without building the concatenation."""
    for block, piece in zip(target.split([p.shape[0] for p in pieces]), pieces):
        block.copy_(piece)


@dataclass(frozen=True)
class Binding:
    """A rule bound to one local parameter of a (possibly pipeline-sliced) model."""

    rule: Rule
    local_name: str
    layer: Optional[int]  # global layer index, or None

    @property
    def hf_names(self) -> list[str]:
        return [n.format(layer=self.layer) for n in self.rule.hf]


def local_layer_numbers(model: torch.nn.Module, prefix: str = "decoder.layers") -> dict[int, int]:
    """Local layer index -> global layer index, read from Megatron's own `layer_number`
    (1-based, global), so uneven pipeline splits need no arithmetic here."""
    block = model.get_submodule(prefix)
    return {i: layer.layer_number - 1 for i, layer in enumerate(block)}


def bind_rules(
    model: torch.nn.Module,
    rules: Iterable[Rule],
    layer_prefixes: Optional[dict[str, dict[int, int]]] = None,
) -> list[Binding]:
    """Match rules to the parameters this model (stage) actually holds.

    `layer_prefixes` maps a layer-list prefix (e.g. "decoder.layers") to its local->global
    index table; rules whose parameter is absent on this stage are skipped.
    """
    names = set(_tensor_names(model))
    layer_prefixes = layer_prefixes or {"decoder.layers": local_layer_numbers(model)}
    bindings = []
    for rule in rules:
        if not rule.per_layer:
            if rule.mcore in names:
                bindings.append(Binding(rule, rule.mcore, None))
            continue
        prefix = rule.mcore.split(".{layer}")[0]
        for local, global_ in layer_prefixes.get(prefix, {}).items():
            local_name = rule.mcore.replace("{layer}", str(local))
            if local_name in names:
                bindings.append(Binding(rule, local_name, global_))
    return bindings


def _tensor_names(model: torch.nn.Module) -> list[str]:
    return [k for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")]


def unmapped_parameters(model: torch.nn.Module, bindings: Sequence[Binding]) -> list[str]:
    bound = {b.local_name for b in bindings}
    return [n for n, _ in model.named_parameters() if n not in bound]


def load_hf_weights(
    model: torch.nn.Module,
    get_hf_tensor: Callable[[str], torch.Tensor],
    rules: Sequence[Rule],
    tp_rank: int = 0,
    tp: int = 1,
    layer_prefixes: Optional[dict[str, dict[int, int]]] = None,
    progress: Optional[Callable[[Binding], None]] = None,
    defer: Optional[Callable[[torch.Tensor, list[torch.Tensor]], bool]] = None,
) -> int:
    """Fill this rank's Megatron parameters from HF tensors; returns the count loaded.

    Every parameter must be covered by a rule and every shape must match: a mismatch names
    the Megatron tensor, its HF sources and both shapes.

    `defer(parameter, pieces)` is offered every parameter whose shard is HF tensors stored
    unchanged (`Rule.stored_pieces`); when it returns True the parameter is left unfilled and
    the caller takes over (a converter writes the pieces instead, see `dist_io`).
    """
    bindings = bind_rules(model, rules, layer_prefixes)
    missing = unmapped_parameters(model, bindings)
    if missing:
        raise MappingError(f"no mapping rule for Megatron parameters: {', '.join(missing[:8])}"
                           + (" ..." if len(missing) > 8 else ""))
    targets = model.state_dict(keep_vars=True)
    for binding in bindings:
        sources = [get_hf_tensor(name) for name in binding.hf_names]
        target = targets[binding.local_name]
        _check_shard_shape(binding, sources, target, tp_rank, tp)
        pieces = binding.rule.stored_pieces(sources, tp_rank, tp) if defer else None
        if pieces is None or not defer(target, pieces):
            with torch.no_grad():
                binding.rule.fill(target, sources, tp_rank, tp)
        if progress:
            progress(binding)
    return len(bindings)


def _check_shard_shape(binding: Binding, sources: Sequence[torch.Tensor], target: torch.Tensor,
                       tp_rank: int, tp: int) -> None:
    """Raise a MappingError naming the tensors and shapes unless this rank's piece of the
    sources fits `target`; worked out on meta tensors, so nothing is copied."""
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(binding.hf_names, sources))
    metas = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in sources]
    try:
        full = binding.rule.transform.to_mcore(metas)
    except RuntimeError as err:
        raise MappingError(f"{binding.local_name}: cannot build from {shapes}: {err}") from err
    shard = binding.rule.split(full, tp_rank, tp)
    if shard.shape != target.shape:
        raise MappingError(
            f"{binding.local_name}: checkpoint gives shape {tuple(shard.shape)} (from "
            f"{shapes}) but the model expects {tuple(target.shape)} at TP rank {tp_rank}/{tp}"
        )


def export_hf_weights(
    model: torch.nn.Module,
    rules: Sequence[Rule],
    gather_tp: Callable[[torch.Tensor], "list[torch.Tensor] | torch.Tensor"] = lambda t: [t],
    layer_prefixes: Optional[dict[str, dict[int, int]]] = None,
    skip: Callable[[Rule], bool] = lambda rule: False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every parameter this stage holds, one rule at a time.

    `gather_tp(shard)` returns all TP ranks' shards in rank order (an all-gather on real
    groups), or the full tensor they merge into when it builds that itself; memory stays
    bounded by one full tensor at a time.
    """
    state = model.state_dict(keep_vars=True)
    for binding in bind_rules(model, rules, layer_prefixes):
        if skip(binding.rule):
            continue
        shard = state[binding.local_name].detach()
        gathered = gather_tp(shard) if binding.rule.tp_dim is not None else [shard]
        full = gathered if isinstance(gathered, torch.Tensor) else binding.rule.merge(gathered)
        yield from zip(binding.hf_names, binding.rule.transform.to_hf(full))


def export_hf_shards(
    model: torch.nn.Module,
    rules: Sequence[Rule],
    tp_rank: int,
    tp: int,
    layer_prefixes: Optional[dict[str, dict[int, int]]] = None,
    skip: Callable[[Rule], bool] = lambda rule: False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Like `export_hf_weights`, but without communication: (HF name, this TP rank's block of
    that tensor along the rule's TP dimension; the full tensor for replicated rules)."""
    state = model.state_dict(keep_vars=True)
    for binding in bind_rules(model, rules, layer_prefixes):
        if skip(binding.rule):
            continue
        shard = state[binding.local_name].detach()
        yield from zip(binding.hf_names, binding.rule.shard_to_hf(shard, tp_rank, tp))
