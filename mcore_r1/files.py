"""Atomic file writes: a reader sees the old content or the new, never half a file.

The text goes to a temporary sibling (same directory, so the rename stays on one filesystem),
is flushed to disk, and replaces the target with one `os.replace`. On failure the temporary
file is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (creating its directory if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
