"""Reading raw rows from wherever a dataset lives, each row tagged with its location.

Accepted `spec`s (the value of ``data.train_files`` / ``data.val_files``; several may be joined
with commas):

* a ``.jsonl`` / ``.json`` / ``.parquet`` file;
* a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``; then
  ``folder@split`` picks the split, default ``train``);
* any other folder: every jsonl/json/parquet file under it, in sorted order;
* ``name@split`` that is not a local path: ``datasets.load_dataset(name, split=split)`` in
  offline mode, so hub datasets work when their files are already in the local cache.

Rows are yielded as `RawRow(row, where, base_dir)`: `where` names the file and line/row for
error messages, `base_dir` is where relative image paths are resolved. A malformed JSON line is
a `DataError` like any other bad row, so the caller decides between failing and skipping.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from mcore_r1.data.errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class RawRow:
    row: Any                 # a dict for well-formed rows; a DataError for unreadable ones
    where: str               # "path line N" / "path row N"
    base_dir: Optional[Path]  # directory relative image paths start from


def read_rows(spec: str) -> Iterator[RawRow]:
    """Every row of every source named in `spec` (comma-separated), in a stable order."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("no data files given (empty data path)")
    for part in parts:
        yield from _read_one(part)


def _split_at(spec: str) -> tuple[str, Optional[str]]:
    if "@" in spec and not Path(spec).exists():
        name, split = spec.rsplit("@", 1)
        return name, split or None
    return spec, None


def _read_one(spec: str) -> Iterator[RawRow]:
    name, split = _split_at(spec)
    path = Path(name).expanduser()
    if path.is_file():
        yield from _read_file(path)
    elif path.is_dir() and _is_saved_dataset(path):
        yield from _read_saved(path, split)
    elif path.is_dir() and split is None:
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no {', '.join(FILE_SUFFIXES)} files")
        for file in files:
            yield from _read_file(file)
    elif split is not None:
        yield from _read_hub(name, split or "train")
    else:
        raise FileNotFoundError(f"data source {spec!r} does not exist (file, folder or name@split)")


def _read_file(path: Path) -> Iterator[RawRow]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield RawRow(row, f"{path} row {i}", path.parent)
    else:
        raise ValueError(f"{path}: unsupported data file type; use one of {', '.join(FILE_SUFFIXES)}")


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                row = DataError(where, f"malformed JSON ({err.msg} at column {err.colno})")
            if not isinstance(row, (dict, DataError)):
                row = DataError(where, f"expected a JSON object, got {type(row).__name__}")
            yield RawRow(row, where, path.parent)


def _read_json(path: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}", f"malformed JSON ({err.msg})") from err
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]  # the {"data": [...]} layout some exporters write
    if not isinstance(data, list):
        raise DataError(str(path), "a .json data file must hold a list of objects")
    for i, row in enumerate(data):
        where = f"{path} row {i}"
        yield RawRow(row if isinstance(row, dict) else DataError(where, "not a JSON object"),
                     where, path.parent)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_saved(path: Path, split: Optional[str]) -> Iterator[RawRow]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise ValueError(f"{path}: no split {split!r}; splits: {', '.join(loaded)}")
        loaded, label = loaded[split], f"{path}@{split}"
    else:
        label = str(path)
    for i, row in enumerate(loaded):
        yield RawRow(row, f"{label} row {i}", path)


def _read_hub(name: str, split: str) -> Iterator[RawRow]:
    """A hub dataset from the local cache (never the network) or a local repo-style folder."""
    import datasets

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # this machine has no network anyway
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise FileNotFoundError(
            f"dataset {name}@{split} is neither a local path nor in the local datasets cache ({err})"
        ) from err
    base = Path(name) if Path(name).is_dir() else None
    for i, row in enumerate(loaded):
        yield RawRow(row, f"{name}@{split} row {i}", base)
