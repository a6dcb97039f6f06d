"""Plan a run's GPU memory before launching it: `tools/plan.py +experiment=NAME [overrides]`.

Composes the config exactly as `python -m mcore_r1.main` does (same Hydra overrides), validates
it for the cluster it describes (no weights needed: `model.config` supplies the shape), then
prints per GPU the weights, gradients, optimizer state, activations, reference model, vLLM
weights and KV cache of each memory peak (`mcore_r1.plan.memory`).

  --search      list every valid (TP, PP, rollout TP) for the experiment's GPU count, fitting first
  --simulate    also build the Megatron model of the real config on the meta device for the
                first/last pipeline stage and TP rank and check the HF weight mapping against it
  --reserve-gib GiB per GPU kept out of the budget (default: mcore_r1.plan.memory.RESERVE_GIB)

Exit status: 0 the plan fits (and the simulation passed), 1 it does not, 2 invalid config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcore_r1.config import ConfigError, compose, resolve_model_hf_config, to_config, validate  # noqa: E402
from mcore_r1.plan.memory import RESERVE_GIB, plan  # noqa: E402
from mcore_r1.plan.report import format_plan  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search", action="store_true", help="rank every valid layout")
    parser.add_argument("--simulate", action="store_true", help="meta-device shape simulation too")
    parser.add_argument("--reserve-gib", type=float, default=RESERVE_GIB)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=qwen2_5_vl_7b")
    args = parser.parse_args(argv)
    try:
        cfg = to_config(compose(args.overrides))
        validate(cfg)
        hf, source = resolve_model_hf_config(cfg.model, cfg.data)
    except ConfigError as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2
    title = f"{' '.join(args.overrides)} ({source})"
    result = plan(cfg, hf, reserve_gib=args.reserve_gib)
    print(format_plan(result, title))
    ok = result.fits
    if args.search:
        from mcore_r1.plan.search import format_search, search

        print("\nlayouts for", cfg.trainer.nnodes * cfg.trainer.devices_per_node, "GPUs:")
        print(format_search(search(cfg, hf), cfg.trainer.gpu_memory_gib))
    if args.simulate:
        from mcore_r1.plan.simulate import simulate_layout

        report = simulate_layout(cfg, hf)
        print("\n" + report.describe())
        ok = ok and report.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
