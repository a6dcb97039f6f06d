"""Where a run's numbers go: a progress bar, one console line per step, metrics.jsonl, TensorBoard.

`PhaseTimer` times each phase of a step (`timing/<phase>` seconds). `MetricsLogger` writes every
step's metrics as one JSON line (flushed at once, so a crash keeps every finished step), as
TensorBoard scalars, and as a compact console line; the progress bar over training steps shows
the ETA. Non-finite values are written as they are (JSON `NaN`), never hidden.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

CONSOLE_KEYS = (  # (metric, label, format) for the one-line summary
    ("reward/overall", "reward", ".3f"), ("reward/accuracy", "acc", ".3f"),
    ("val/accuracy", "val_acc", ".3f"), ("actor/kl", "kl", ".4f"), ("actor/entropy", "ent", ".3f"),
    ("response/length_mean", "len", ".1f"), ("perf/tokens_per_s", "tok/s", ".0f"),
    ("timing/step", "s", ".1f"),
)


class PhaseTimer:
    """Seconds per phase; also remembers which phase (innermost first) an error escaped from."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.active: list[str] = []
        self.failed_in: Optional[str] = None

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        self.active.append(phase)
        try:
            yield
        except BaseException:
            self.failed_in = self.failed_in or " > ".join(self.active)
            raise
        finally:
            self.active.pop()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}": v for k, v in self.seconds.items()}


def console_line(step: int, total: int, metrics: dict) -> str:
    parts = [f"step {step}/{total}"]
    for key, label, fmt in CONSOLE_KEYS:
        if key in metrics:
            parts.append(f"{label} {metrics[key]:{fmt}}")
    phases = [f"{k[len('timing/'):]} {v:.1f}" for k, v in metrics.items()  # sub-phases (a/b): jsonl only
              if k.startswith("timing/") and k != "timing/step" and "/" not in k[len("timing/"):]]
    if phases:
        parts.append("(" + ", ".join(phases) + ")")
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, run_dir: Path, backends: Iterable[str], total_steps: int, start_step: int = 0,
                 log_every: int = 1):
        self.run_dir = Path(run_dir)
        self.backends = set(backends)
        self.total, self.log_every = total_steps, max(1, log_every)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") if "jsonl" in self.backends else None
        self.tb = None
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run redoes the steps after its checkpoint: drop their old events.
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        self.bar = None
        if "console" in self.backends:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step",
                            dynamic_ncols=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def log(self, step: int, metrics: dict, advance: bool = True) -> None:
        """Metrics of training step `step` (1-based); `advance=False` for extra records (e.g.
        the validation before training)."""
        record = {"step": step, "time": time.time(), **{k: _number(v) for k, v in metrics.items()}}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.bar is not None and advance:
            self.bar.update(1)
        if "console" in self.backends and (step % self.log_every == 0 or not advance):
            self.write(console_line(step, self.total, metrics))

    def close(self) -> None:
        for closer in (self.jsonl, self.tb, self.bar):
            if closer is not None:
                closer.close()


def _number(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return value
    return str(value)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (for tests, plots and resumption checks)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def is_finite(value: Optional[float]) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
