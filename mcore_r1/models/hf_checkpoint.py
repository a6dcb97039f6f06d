"""Reading and writing Hugging Face safetensors checkpoints, one tensor at a time.

Reads go through `safe_open` per file, so memory holds only the tensors being converted. Writes
produce the usual sharded layout (`model-00001-of-0000N.safetensors` plus
`model.safetensors.index.json`) with shards bounded by a byte budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint file; the message names it."""


class HFCheckpointReader:
    """Random access to the tensors of an HF checkpoint directory."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
        elif (self.dir / SINGLE_NAME).is_file():
            with safe_open(self.dir / SINGLE_NAME, "pt") as f:
                weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise CheckpointError(f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME}")
        self.weight_map: dict[str, str] = weight_map
        missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise CheckpointError(f"{self.dir}: shard file(s) listed in the index are missing: "
                                  + ", ".join(missing))
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is not in the checkpoint")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.dir / file, "pt")
        return self._handles[file].get_tensor(name)

    __call__ = get


def write_sharded_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, max_shard_bytes: int = 2 << 30
) -> dict[str, str]:
    """Write (name, tensor) pairs as sharded safetensors plus the index; returns the weight map.

    Shards are flushed as soon as they reach `max_shard_bytes`, so memory holds at most one
    shard. Files are named after the final shard count once it is known.
    """
    out_dir = Path(out_dir)
    written: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal current, size
        if current:
            path = out_dir / f".shard-{len(written):05d}.safetensors"
            save_file(current, path, metadata={"format": "pt"})
            written.append((path, list(current)))
            current, size = {}, 0

    for name, tensor in tensors:
        if name in current or any(name in names for _, names in written):
            raise CheckpointError(f"tensor {name!r} produced twice")
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    weight_map = {}
    for i, (path, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(out_dir / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def iter_tensors(reader: HFCheckpointReader) -> Iterator[tuple[str, torch.Tensor]]:
    for name in reader.keys():
        yield name, reader.get(name)
