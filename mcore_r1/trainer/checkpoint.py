"""Training checkpoints on the driver's side: where they live, when one counts, which to resume.

Layout under `<trainer.output_dir>/checkpoints/`:

    step_000004/                one complete checkpoint
        model/ optimizer/       the workers' share (critic/ critic_optimizer/ with PPO, rng/)
        hf/                     config, tokenizer and processor of the model
        mcore_r1_checkpoint.json  converter metadata: `convert_hf_mcore.py mcore-to-hf` reads
                                the directory as it is
        trainer_state.json      step, data position, controllers, reward counters, run id,
                                the validation metrics of that step
        manifest.json           every file with its size, written last
    .step_000006.partial/       being written, or left by a crash: never read, removed later
    latest                      name of the newest complete checkpoint (atomic replace)
    best                        the checkpoint with the best `trainer.best_metric`, if any

A checkpoint is complete once its directory has its final name: everything is written into
the `.partial` directory first, the manifest last, then one rename publishes it and only then
`latest` moves. A crash at any moment leaves `latest` on a complete checkpoint. Resuming
(`auto`) verifies the manifest (every file present, every size right) and falls back to the
next older complete checkpoint when the newest one is damaged, saying so.

Sizes catch truncated and missing files, the damage a crash or a full disk does; a flipped
bit inside a shard is caught when Megatron reads it, and the error names the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mcore_r1.files import write_atomic

log = logging.getLogger("mcore_r1.checkpoint")

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the cause."""


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> None:
    files = {str(p.relative_to(directory)): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file()}
    write_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def verify(directory: Path) -> None:
    """Raise `CheckpointError` unless `directory` is a complete checkpoint as its manifest says."""
    manifest = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not manifest.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}, so the checkpoint was never completed")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{manifest}: unreadable manifest ({err})") from None
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{directory}: {name} has {path.stat().st_size} bytes, the "
                                  f"manifest says {size} (truncated or overwritten)")


def read_state(directory: Path) -> dict:
    return json.loads((directory / STATE_FILE).read_text())


@dataclass
class CheckpointManager:
    root: Path
    keep_last: int = 2
    best_metric: str = ""

    def complete_checkpoints(self) -> list[Path]:
        """Directories named step_N, newest first (completeness is checked by `verify`)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if p.is_dir() and (m := STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def pointer(self, name: str) -> Optional[str]:
        path = self.root / name
        return path.read_text().split()[0] if path.is_file() else None

    # -- resume -----------------------------------------------------------------------------

    def resolve(self, resume: str) -> Optional[Path]:
        """The checkpoint `trainer.resume` asks for: None for off (or auto with nothing saved)."""
        if resume == "off":
            return None
        if resume == "auto":
            return self.newest_complete(self.root)
        path = Path(resume).expanduser().absolute()
        if not path.exists():
            raise CheckpointError(f"trainer.resume={resume}: {path} does not exist")
        if not STEP_DIR.match(path.name):  # a checkpoints root: its newest complete one
            found = self.newest_complete(path)
            if found is None:
                raise CheckpointError(f"trainer.resume={resume}: no complete checkpoint in {path}")
            return found
        verify(path)
        return path

    def newest_complete(self, root: Path) -> Optional[Path]:
        for path in CheckpointManager(root).complete_checkpoints():
            try:
                verify(path)
                return path
            except CheckpointError as err:
                log.warning("skipping damaged checkpoint: %s", err)
                print(f"mcore_r1: skipping damaged checkpoint: {err}", flush=True)
        return None

    # -- save -------------------------------------------------------------------------------

    def begin(self, step: int) -> Path:
        """A fresh staging directory for `step` (left-overs of crashed saves are removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = self.root / f".{step_name(step)}.partial"
        staging.mkdir()
        return staging

    def finish(self, staging: Path, step: int, state: dict, model_dir: Path) -> Path:
        """Add the driver's files to `staging`, publish it as step_N, move `latest`, prune."""
        from mcore_r1.models.convert import FORMAT_VERSION, META_NAME, copy_hf_metadata
        from mcore_r1.models.registry import read_hf_config

        copy_hf_metadata(model_dir, staging / "hf")
        hf = read_hf_config(model_dir)
        meta = {"format_version": FORMAT_VERSION, "architecture": hf["architectures"][0],
                "saved_layout": state["layout"], "source": str(model_dir), "step": step}
        write_atomic(staging / META_NAME, json.dumps(meta, indent=2) + "\n")
        write_atomic(staging / STATE_FILE, json.dumps(state, indent=1, sort_keys=True) + "\n")
        write_manifest(staging)
        final = self.root / step_name(step)
        if final.exists():  # a re-run of the same step (resumed from an older checkpoint)
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(self.root)
        write_atomic(self.root / "latest", final.name + "\n")
        self._update_best(final, state.get("val_metrics") or {})
        self.prune()
        return final

    def abandon(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def _update_best(self, final: Path, val_metrics: dict) -> None:
        value = val_metrics.get(self.best_metric) if self.best_metric else None
        if value is None:
            return
        current = self.best()
        if current is None or value > current["value"] or not (self.root / current["name"]).is_dir():
            write_atomic(self.root / "best", json.dumps(
                {"name": final.name, "metric": self.best_metric, "value": value}) + "\n")

    def best(self) -> Optional[dict]:
        path = self.root / "best"
        return json.loads(path.read_text()) if path.is_file() else None

    def prune(self) -> None:
        """Keep the newest `keep_last` checkpoints and the best one; delete the rest."""
        keep = {p.name for p in self.complete_checkpoints()[:max(1, self.keep_last)]}
        best = self.best()
        if best is not None:
            keep.add(best["name"])
        for path in self.complete_checkpoints():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def free_mib(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20

    def describe_previous(self, exclude: Optional[str] = None) -> str:
        """Where the newest complete checkpoint is, for messages after a failed save."""
        name = self.pointer("latest")
        if name and name != exclude and (self.root / name).is_dir():
            return f"the previous checkpoint {self.root / name} is intact"
        return "there is no earlier checkpoint"
