"""Evaluation result caching: a key from model, dataset and settings; atomic file publishing.

The key is a SHA-256 over three fingerprints:

* model: config.json's bytes plus name, size and mtime of every checkpoint file (hashing the
  weights themselves would take minutes for large models; touching or replacing a file changes
  the key, which errs on the side of re-running);
* dataset: the loaded prompts themselves (token ids, answers, image pixels), so the key follows
  the *effective* data: format prompt, pixel limits, row filtering all included;
* settings: sampling options, the reward config (and the bytes of a custom reward file), k.

Results are published by writing to a temporary name in the same directory and renaming, so
readers never see half a file and a crash leaves no partial result behind; `metrics.json` is
written last and marks a complete result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable


def model_fingerprint(model_dir: Path, config_file: Path = Path("config.json")) -> dict:
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {
        "config_sha256": hashlib.sha256((model_dir / config_file).read_bytes()).hexdigest(),
        "files": [[str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def dataset_fingerprint(items: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.prompt_token_ids, item.answer]).encode())
        for image in item.images:
            digest.update(repr((image.size, image.mode)).encode())
            digest.update(image.tobytes())
    return digest.hexdigest()


def file_sha256_if_path(spec: str) -> str | None:
    """Hash of a custom reward file named by `path.py[:fn]`, so editing it invalidates the cache."""
    path = Path(spec.partition(":")[0]).expanduser()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.suffix == ".py" and path.is_file() else None


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    cache = os.environ.get("MCORE_R1_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "mcore_r1"
    return base / "eval"


def publish_dir(files: dict[str, str], target: Path) -> None:
    """Create directory `target` holding `files` (name -> text) in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "metrics.json").is_file():
                raise  # something else is in the way; a finished result from a racing run is fine
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
