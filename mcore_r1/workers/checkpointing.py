"""The worker side of a training checkpoint: model, optimizer, scheduler and RNG of one rank.

Every rank calls `save_state` / `load_state` together (they are collectives). The model goes
to `model/` in exactly the layout `mcore_r1.models.convert` writes, so a training checkpoint
is also a converter checkpoint: `convert_hf_mcore.py mcore-to-hf` exports it as it is.
Optimizer and scheduler go to `optimizer/` as Megatron sharded state dicts keyed by the
model's sharded tensors, which is what makes a checkpoint saved at one TP/PP load at another
(Adam's moments are resharded like the weights they belong to). The critic, when there is
one, gets `critic/` and `critic_optimizer/` the same way.

RNG states cannot be resharded: they are saved per rank (`rng/rank_NNNNN.pt`) with the layout
they belong to, and restored only when the layout is the same; at another layout each rank
keeps its fresh seeding (said in the log). Rollout sampling does not depend on them: every
prompt carries its own seed (`mcore_r1.trainer.rollout`).

On GPU with the distributed optimizer, its state is written in Megatron's fully reshardable
format, so the same cross-layout property holds there.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("mcore_r1.checkpoint")


def _optimizer_metadata(optimizer) -> dict:
    from mcore_r1.parallel.device import cuda_available

    # Only the distributed optimizer reads this; "fully_reshardable" lets another DP/TP/PP
    # layout load its state (the default format ties it to the saving layout).
    return {"distrib_optim_sharding_type": "fully_reshardable"} if cuda_available() else {}


def _mkdir_rank0(path: Path) -> None:
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def save_model(module: torch.nn.Module, optimizer, scheduler, path: Path, model_dir: str,
               optimizer_dir: str) -> None:
    """Write one model chunk (DDP's `.module`) and its optimizer and scheduler state."""
    from megatron.core import dist_checkpointing

    from mcore_r1.models.dist_io import save_strategy

    _mkdir_rank0(path / model_dir)
    dist_checkpointing.save(module.sharded_state_dict(), str(path / model_dir),
                            sharded_strategy=save_strategy())
    _mkdir_rank0(path / optimizer_dir)
    state = {"optimizer": optimizer.sharded_state_dict(module.sharded_state_dict(),
                                                       metadata=_optimizer_metadata(optimizer)),
             "scheduler": scheduler.state_dict()}
    dist_checkpointing.save(state, str(path / optimizer_dir), sharded_strategy=save_strategy())


def load_model(module: torch.nn.Module, optimizer, scheduler, path: Path, model_dir: str,
               optimizer_dir: str) -> None:
    """Load one model chunk and its optimizer/scheduler state, at this run's layout."""
    from megatron.core import dist_checkpointing

    from mcore_r1.models.dist_io import load_strategy, merge_in_place

    for sub in (model_dir, optimizer_dir):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"checkpoint {path} has no {sub}/ directory")
    weights = dist_checkpointing.load(merge_in_place(module.sharded_state_dict()),
                                      str(path / model_dir),
                                      sharded_strategy=load_strategy())
    module.load_state_dict(weights, strict=True)
    template = {"optimizer": optimizer.sharded_state_dict(
        module.sharded_state_dict(), is_loading=True, metadata=_optimizer_metadata(optimizer)),
        "scheduler": None}
    state = dist_checkpointing.load(template, str(path / optimizer_dir),
                                    sharded_strategy=load_strategy())
    optimizer.load_state_dict(state["optimizer"])
    # Megatron keeps fp32 master copies for bf16/fp16 training; refresh the model's weights
    # from them so both agree (a no-op for the fp32 optimizer).
    optimizer.reload_model_params()
    scheduler.load_state_dict(state["scheduler"])


def _rng_file(path: Path, rank: int) -> Path:
    return path / "rng" / f"rank_{rank:05d}.pt"


def rng_state(layout: dict) -> dict:
    from megatron.core.tensor_parallel import random as mrandom

    return {"layout": layout, "python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "tracker": mrandom.get_cuda_rng_tracker().get_states()}


def save_rng(path: Path, layout: dict) -> None:
    _mkdir_rank0(path / "rng")
    torch.save(rng_state(layout), _rng_file(path, dist.get_rank()))


def load_rng(path: Path, layout: dict) -> Optional[str]:
    """Restore this rank's RNG streams if the checkpoint was written at `layout`; otherwise
    leave the fresh seeding in place and say why (returned for the log)."""
    from megatron.core.tensor_parallel import random as mrandom

    file = _rng_file(path, dist.get_rank())
    if not file.is_file():
        return f"{file} is missing: RNG streams keep this run's seeding"
    state = torch.load(file, weights_only=False)
    if state["layout"] != layout:
        return (f"checkpoint RNG streams were saved at {state['layout']}, this run is {layout}: "
                "they keep this run's seeding")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    mrandom.get_cuda_rng_tracker().set_states(state["tracker"])
    return None
