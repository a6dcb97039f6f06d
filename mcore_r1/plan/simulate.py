"""Shape simulation at full size: the real model's Megatron stages on the meta device.

For an experiment's layout, without GPUs, weights or a real process group of that size:

1. `fake_world` makes this one process rank r of the experiment's world: torch's "fake"
   process-group backend (every collective a no-op, but real group sizes and ranks) under
   Megatron's own `initialize_model_parallel`, so every builder reads the true TP/PP sizes and
   ranks from `parallel_state` and `pg_collection`, exactly as in a run.
2. `build_model` (the trainer's builder) runs under `torch.device("meta")`: tensors get shapes
   and no storage, so a 72B stage costs no memory and about a second.
3. The HF side is the real checkpoint's tensor list: transformers' own model class for the
   config, built on the meta device, its state dict renamed to the checkpoint layout the way
   `save_pretrained` does (`hf_tensor_shapes`).
4. The trainer's loader, `mapping.load_hf_weights`, fills the meta model from meta HF tensors
   (every shape checked, every Megatron parameter must have a rule), and the refit's exporter,
   `mapping.export_hf_weights`, turns the stage back into HF tensors whose names and shapes
   must be the checkpoint's.

The build uses Megatron's local layer spec (`cpu_layer_spec`), the one a CPU machine uses; the
TransformerEngine spec of GPU nodes names the fused norms differently and is only exercised by
a GPU run. Checked for TP rank 0 and the last TP rank of every pipeline stage: the parameter count equals
the planner's (`plan.params.stage_params`), and over all stages every checkpoint tensor is
consumed, none is missing and none is left over.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from mcore_r1.config.schema import Config


@dataclass
class RankCheck:
    rank: int
    tp_rank: int
    pp_rank: int
    params: int
    planned: int
    loaded: int                     # Megatron tensors filled by load_hf_weights
    exported: int                   # HF tensors produced by export_hf_weights
    errors: list[str] = field(default_factory=list)


@dataclass
class SimulationReport:
    layout: str
    checks: list[RankCheck]
    missing: list[str]              # checkpoint tensors no stage consumed
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.missing and all(not c.errors for c in self.checks)

    def describe(self) -> str:
        lines = [f"shape simulation ({self.layout}, meta device, {self.seconds:.1f} s):"]
        for c in self.checks:
            status = "ok" if not c.errors else "FAILED"
            lines.append(f"  rank {c.rank:>3} (TP {c.tp_rank}, PP {c.pp_rank}): {c.params / 1e9:.3f}B "
                         f"parameters (planned {c.planned / 1e9:.3f}B), {c.loaded} tensors loaded, "
                         f"{c.exported} exported: {status}")
            lines += [f"    ! {e}" for e in c.errors[:10]]
        lines.append("  every checkpoint tensor mapped" if not self.missing else
                     f"  ! {len(self.missing)} checkpoint tensors mapped by no stage: {self.missing[:8]}")
        return "\n".join(lines)


@contextlib.contextmanager
def fake_world(world: int, rank: int, tp: int, pp: int, cp: int = 1) -> Iterator[None]:
    """This process as `rank` of `world` ranks with Megatron's TP/PP/CP groups (fake backend)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("fake_world needs a process without a torch.distributed group")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        # no gloo side groups: the fake backend cannot create them, and nothing here communicates
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      context_parallel_size=cp, create_gloo_process_groups=False)
        yield
    finally:
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        dist.destroy_process_group()


def megatron_rank(world: int, tp: int, pp: int, tp_rank: int, pp_rank: int) -> int:
    """Global rank of (TP rank, PP rank) at DP = CP rank 0 in Megatron's tp-cp-ep-dp-pp order."""
    return pp_rank * (world // pp) + tp_rank


def hf_tensor_shapes(hf: dict[str, Any]) -> dict[str, torch.Size]:
    """Checkpoint tensor name -> shape of the model `hf` describes (transformers, meta device)."""
    import transformers
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    config = transformers.CONFIG_MAPPING[hf["model_type"]].from_dict(hf)
    cls = getattr(transformers, hf["architectures"][0])
    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.bfloat16)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return {name: t.shape for name, t in revert_weight_conversion(model, state).items()}


def check_rank(cfg: Config, hf: dict[str, Any], shapes: dict[str, torch.Size], tp_rank: int,
               pp_rank: int, consumed: set[str]) -> RankCheck:
    """Build this rank's stage on the meta device and run the loader and exporter over it."""
    from megatron.core import parallel_state as mpu

    from mcore_r1.models.builder import build_model, export_skip, layer_tables, weight_rules
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.models.mapping import MappingError, export_hf_weights, load_hf_weights
    from mcore_r1.parallel import device as devmod
    from mcore_r1.plan.params import stage_params

    par, t = cfg.parallel, cfg.trainer
    world = t.nnodes * t.devices_per_node
    rank = megatron_rank(world, par.tp, par.pp, tp_rank, pp_rank)
    with fake_world(world, rank, par.tp, par.pp, par.cp):
        devmod.ensure_runtime()
        got = (mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank())
        with torch.device("meta"):
            model = build_model(hf, ModelLayout(tp=par.tp, pp=par.pp, cp=par.cp), torch.bfloat16,
                                pre_process=mpu.is_pipeline_first_stage(),
                                post_process=mpu.is_pipeline_last_stage(), init_weights=False)
        check = RankCheck(rank, tp_rank, pp_rank, sum(p.numel() for p in model.parameters()),
                          stage_params(hf, par.tp, par.pp, pp_rank).total, 0, 0)
        if got != (tp_rank, pp_rank):
            check.errors.append(f"Megatron placed rank {rank} at (TP, PP) = {got}")
        if check.params != check.planned:
            check.errors.append(f"{check.params} parameters built, the planner counts {check.planned}")
        rules, tables = weight_rules(hf, par.tp), layer_tables(model)

        def hf_tensor(name: str) -> torch.Tensor:
            if name not in shapes:
                raise MappingError(f"rule asks for {name!r}, which the checkpoint does not have")
            consumed.add(name)
            return torch.empty(shapes[name], dtype=torch.bfloat16, device="meta")

        try:
            check.loaded = load_hf_weights(model, hf_tensor, rules, tp_rank=tp_rank, tp=par.tp,
                                           layer_prefixes=tables)
            for name, tensor in export_hf_weights(model, rules, lambda s: [s] * par.tp, tables,
                                                  skip=export_skip(hf)):
                check.exported += 1
                if shapes.get(name) != tensor.shape:
                    check.errors.append(f"export gives {name} {tuple(tensor.shape)}, checkpoint has "
                                        f"{tuple(shapes[name]) if name in shapes else 'no such tensor'}")
        except MappingError as err:
            check.errors.append(str(err))
    return check


@contextlib.contextmanager
def cpu_layer_spec() -> Iterator[None]:
    """Build with Megatron's local layers even on a GPU machine: TransformerEngine modules
    allocate on the GPU whatever the default device, which a meta-device build must not do."""
    old = os.environ.get("MCORE_R1_FORCE_CPU")
    os.environ["MCORE_R1_FORCE_CPU"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MCORE_R1_FORCE_CPU", None)
        else:
            os.environ["MCORE_R1_FORCE_CPU"] = old


def simulate_layout(cfg: Config, hf: dict[str, Any]) -> SimulationReport:
    """TP rank 0 and the last TP rank of every pipeline stage; see the module docstring."""
    start = time.perf_counter()
    shapes = hf_tensor_shapes(hf)
    consumed: set[str] = set()
    par = cfg.parallel
    with cpu_layer_spec():
        checks = [check_rank(cfg, hf, shapes, tp_rank, pp_rank, consumed)
                  for pp_rank in range(par.pp) for tp_rank in sorted({0, par.tp - 1})]
    missing = sorted(set(shapes) - consumed)
    layout = f"TP {par.tp} x PP {par.pp} x CP {par.cp} of {cfg.trainer.nnodes * cfg.trainer.devices_per_node}"
    return SimulationReport(layout, checks, missing, time.perf_counter() - start)
