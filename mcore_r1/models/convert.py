"""HF <-> Megatron distributed-checkpoint conversion, and a logit check between the two.

Layout of an mcore_r1 Megatron checkpoint directory:
  model/                    megatron.core.dist_checkpointing (torch_dist); loads at any TP/PP
  hf/                       the source config.json, generation config, tokenizer and processor
  mcore_r1_checkpoint.json  format version, architecture, the layout it was written at

A training checkpoint (`mcore_r1.trainer.checkpoint`) has the same three plus optimizer and
trainer state, so everything here reads it as it is.

Every function runs on all ranks of an initialised Megatron world (one process is a world
too). Output is built in a hidden staging directory next to the target and renamed into place
by rank 0 only when complete, so an interrupted conversion never leaves a directory that looks
finished. Each rank converts only its own shard, one tensor at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
import torch
import torch.distributed as dist

from mcore_r1.models.builder import (
    build_model, export_skip, gc_paused, layer_tables, load_hf_model, weight_rules,
)
from mcore_r1.models.dense import ModelLayout
from mcore_r1.models.dist_io import DirectWrites, load_strategy, merge_in_place, save_strategy
from mcore_r1.models.hf_checkpoint import write_index, write_shards
from mcore_r1.models.mapping import export_hf_weights
from mcore_r1.models.registry import read_hf_config

META_NAME = "mcore_r1_checkpoint.json"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json",
                   ".bin.index.json")


def _is_weight_file(path: Path) -> bool:
    return any(path.name.endswith(s) for s in WEIGHT_SUFFIXES)


def copy_hf_metadata(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer, chat template and processor files (everything but weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not _is_weight_file(path) and not path.name.startswith("."):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def config_dtype(hf: dict) -> torch.dtype:
    """The dtype the HF checkpoint stores its weights in (kept, so round trips are exact)."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"config.json dtype {name!r} is not one of {sorted(dtypes)}")
    return dtypes[name]


def _staging(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def _prepare_output(out_dir: Path, overwrite: bool) -> Path:
    """Rank 0 clears a stale staging directory; every rank gets its path."""
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    staging = _staging(out_dir)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    return staging


def _publish(staging: Path, out_dir: Path) -> None:
    dist.barrier()
    if dist.get_rank() == 0:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    dist.barrier()


def _progress(desc: str):
    """A tqdm bar on global rank 0 (other ranks stay quiet); returns (bar, per-item callback)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="tensor", disable=dist.get_rank() != 0, dynamic_ncols=True)
    return bar, lambda *_: bar.update(1)


def _counted(items, bar):
    for item in items:
        bar.update(1)
        yield item


def _stage_flags() -> dict:
    from megatron.core import parallel_state as mpu

    return dict(pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage())


# Conversions run with the cyclic garbage collector paused: they allocate many short-lived
# objects (load plans, pickles) while torch, Megatron and the model keep hundreds of thousands
# alive, and the full collections this triggers found nothing to free yet took 0.25-0.4 s of
# a 0.45 s Megatron -> HF conversion of a 0.5B model.
@gc_paused()
def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, layout: ModelLayout,
                overwrite: bool = False) -> Path:
    """Write the HF checkpoint `hf_dir` as a Megatron distributed checkpoint at `out_dir`."""
    from megatron.core import dist_checkpointing

    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    hf = read_hf_config(hf_dir)
    staging = _prepare_output(out_dir, overwrite)
    bar, tick = _progress("reading HF weights")
    direct = DirectWrites()  # tensors stored unchanged go from the HF file to the new one
    model, _ = load_hf_model(hf_dir, layout, config_dtype(hf), progress=tick, defer=direct)
    bar.close()
    if dist.get_rank() == 0:
        (staging / "model").mkdir()
    dist.barrier()
    dist_checkpointing.save(direct.point_at_sources(model.sharded_state_dict()),
                            str(staging / "model"),
                            sharded_strategy=save_strategy(fsync=False, checksums=False))
    if dist.get_rank() == 0:
        copy_hf_metadata(hf_dir, staging / "hf")
        meta = {"format_version": FORMAT_VERSION, "architecture": hf["architectures"][0],
                "saved_layout": {"tp": layout.tp, "pp": layout.pp}, "source": str(hf_dir)}
        (staging / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    _publish(staging, out_dir)
    return out_dir


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A converter checkpoint, a training checkpoint (checkpoints/step_N), or a run directory
    or checkpoints directory, read through its `latest` pointer; training checkpoints are
    verified against their manifest first."""
    path = Path(path).absolute()
    for root in (path, path / "checkpoints"):
        pointer = root / "latest"
        if not (path / META_NAME).is_file() and pointer.is_file():
            path = root / pointer.read_text().split()[0]
            break
    if (path / "manifest.json").is_file():
        from mcore_r1.trainer.checkpoint import verify

        verify(path)
    return path


def read_meta(mcore_dir: Path) -> dict:
    path = Path(mcore_dir) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{mcore_dir} is not an mcore_r1 Megatron checkpoint (no {META_NAME})")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return meta


def load_mcore_model(mcore_dir: str | Path, layout: ModelLayout):
    """Build this rank's stage at `layout` and load it from a Megatron checkpoint directory."""
    from megatron.core import dist_checkpointing

    mcore_dir = resolve_checkpoint_dir(mcore_dir)
    read_meta(mcore_dir)
    hf = read_hf_config(mcore_dir / "hf")
    model = build_model(hf, layout, config_dtype(hf), init_weights=False, **_stage_flags())
    state = dist_checkpointing.load(merge_in_place(model.sharded_state_dict()),
                                    str(mcore_dir / "model"), sharded_strategy=load_strategy())
    model.load_state_dict(state, strict=True)
    return model, hf


def _gather_tp(shard: torch.Tensor) -> list[torch.Tensor]:
    from megatron.core import parallel_state as mpu

    group = mpu.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return [shard]
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return pieces


@gc_paused()
def mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, layout: ModelLayout,
                overwrite: bool = False, max_shard_bytes: int = 2 << 30) -> Path:
    """Write a Megatron checkpoint as sharded HF safetensors plus config and tokenizer files."""
    from megatron.core import parallel_state as mpu

    mcore_dir, out_dir = resolve_checkpoint_dir(mcore_dir), Path(out_dir).absolute()
    model, hf = load_mcore_model(mcore_dir, layout)
    staging = _prepare_output(out_dir, overwrite)
    tensors = export_hf_weights(model, weight_rules(hf, layout.tp), _gather_tp,
                                layer_prefixes=layer_tables(model), skip=export_skip(hf))
    writes = mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0
    stage = mpu.get_pipeline_model_parallel_rank()
    if writes:
        bar, _ = _progress("writing HF weights")
        shards = write_shards(_counted(tensors, bar), staging, tag=f"pp{stage:03d}",
                              max_shard_bytes=max_shard_bytes)
        bar.close()
    else:
        for _ in tensors:  # other TP ranks take part in the all-gathers, then drop the result
            pass
        shards = []
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (stage, shards))
    if dist.get_rank() == 0:
        ordered = [s for _, stage_shards in sorted(gathered, key=lambda x: x[0]) for s in stage_shards]
        write_index(staging, ordered)
        copy_hf_metadata(mcore_dir / "hf", staging)
    _publish(staging, out_dir)
    return out_dir
