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

    # transformers also writes VL checkpoints with the language model and vision tower nested
    # under `model.`; the rules use the hub layout, so those names are looked up as aliases.
    ALIASES = (("model.", "model.language_model."), ("visual.", "model.visual."))

    def resolve(self, name: str) -> str:
        if name in self.weight_map:
            return name
        for prefix, alias in self.ALIASES:
            if name.startswith(prefix) and alias + name[len(prefix):] in self.weight_map:
                return alias + name[len(prefix):]
        raise CheckpointError(f"{self.dir}: tensor {name!r} is not in the checkpoint")

    def get(self, name: str) -> torch.Tensor:
        name = self.resolve(name)
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.dir / file, "pt")
        return self._handles[file].get_tensor(name)

    __call__ = get


def write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, tag: str = "0",
    max_shard_bytes: int = 2 << 30,
) -> list[tuple[str, list[str], int]]:
    """Write (name, tensor) pairs into temporary shard files; returns (file, names, bytes).

    A shard is flushed as soon as it reaches `max_shard_bytes`, so memory holds at most one
    shard. `tag` keeps the files of several writers (pipeline stages) apart until
    `write_index` gives them their final names.
    """
    out_dir = Path(out_dir)
    shards: list[tuple[str, list[str], int]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        nonlocal current, size
        if current:
            name = f".part-{tag}-{len(shards):05d}.safetensors"
            save_file(current, out_dir / name, metadata={"format": "pt"})
            shards.append((name, list(current), size))
            current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        size += nbytes
    flush()
    return shards


def write_index(out_dir: str | Path, shards: list[tuple[str, list[str], int]]) -> dict[str, str]:
    """Rename temporary shards to `model-0000i-of-0000N.safetensors` and write the index."""
    out_dir = Path(out_dir)
    weight_map: dict[str, str] = {}
    for i, (tmp_name, names, _) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out_dir / tmp_name).rename(out_dir / final)
        for name in names:
            if name in weight_map:
                raise CheckpointError(f"tensor {name!r} produced twice")
            weight_map[name] = final
    total = sum(size for _, _, size in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def iter_tensors(reader: HFCheckpointReader) -> Iterator[tuple[str, torch.Tensor]]:
    for name in reader.keys():
        yield name, reader.get(name)
