"""The smoke job: what `python -m mcore_r1.main` runs until the RL trainer exists (issue #8).

It proves the stack end to end on this machine: builds (or finds) the configured tiny model
offline, brings up a one-process gloo world with Megatron's parallel groups and the CPU
compatibility layer, loads the checkpoint into Megatron-Core through the HF <-> Megatron
mapping, runs one forward pass (with images for VL models) and reports how far its logits are
from transformers' on the same inputs.
"""

from __future__ import annotations

import os
import time

from mcore_r1.config.schema import Config
from mcore_r1.config.validate import ensure_model_dir
from mcore_r1.models.registry import ModelShape

BANNER = (
    "mcore_r1 smoke job: the RL trainer is not implemented yet (issue #8), so this run builds "
    "the tiny model, loads it into Megatron and checks one forward pass against transformers"
)
TOLERANCE = 1e-4


def run_smoke_job(cfg: Config, shape: ModelShape) -> dict:
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.models.parity import max_logit_diff
    from mcore_r1.parallel.dims import ParallelDims
    from mcore_r1.parallel.runtime import destroy_parallel, initialize_parallel

    print(BANNER, flush=True)
    model_dir = ensure_model_dir(cfg.model)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    initialize_parallel(ParallelDims(1), seed=cfg.trainer.seed)
    try:
        start = time.perf_counter()
        diff = max_logit_diff(model_dir, ModelLayout())
        seconds = time.perf_counter() - start
    finally:
        destroy_parallel()
    result = {
        "model_dir": str(model_dir),
        "architecture": shape.architecture,
        "max_abs_logit_diff_vs_transformers": f"{diff:.3e}",
        "seconds": round(seconds, 2),
    }
    for key, value in result.items():
        print(f"[smoke] {key}: {value}", flush=True)
    if not diff <= TOLERANCE:
        raise RuntimeError(f"smoke job: Megatron and transformers logits differ by {diff:.3e} "
                           f"(> {TOLERANCE:g})")
    print("[smoke] ok", flush=True)
    return result
