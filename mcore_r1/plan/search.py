"""Every layout (TP, PP, rollout TP) of an experiment's GPU count, planned and ranked.

A layout is a candidate when the config validator accepts it (heads, KV groups, vision widths
divisible by TP; layers by PP; mini-batch by DP; rollout TP dividing the world and the heads)
and TP stays within one node (TP all-reduces every layer; across nodes they would be slow).
Everything else (batch sizes, token budget, vLLM utilization, offload) is the experiment's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from mcore_r1.config.schema import Config
from mcore_r1.config.validate import ConfigError, validate
from mcore_r1.plan.memory import GIB, Plan, plan


@dataclass
class Candidate:
    tp: int
    pp: int
    rollout_tp: int
    plan: Plan

    @property
    def peak(self) -> float:
        return max(p.total for p in self.plan.phases)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def with_layout(cfg: Config, tp: int, pp: int, rollout_tp: int) -> Config:
    out = copy.deepcopy(cfg)
    out.parallel.tp, out.parallel.pp, out.rollout.tp = tp, pp, rollout_tp
    out.parallel.vpp = None
    return out


def search(cfg: Config, hf: dict[str, Any]) -> list[Candidate]:
    """All valid layouts, fitting ones first, then by peak memory."""
    world = cfg.trainer.nnodes * cfg.trainer.devices_per_node
    found = []
    for tp in divisors(cfg.trainer.devices_per_node):
        for pp in divisors(world // tp):
            if world % (tp * pp * cfg.parallel.cp):
                continue
            for rtp in divisors(world):
                if rtp > cfg.trainer.devices_per_node:
                    continue
                candidate = with_layout(cfg, tp, pp, rtp)
                try:
                    validate(candidate)
                except ConfigError:
                    continue
                found.append(Candidate(tp, pp, rtp, plan(candidate, hf)))
    return sorted(found, key=lambda c: (not c.plan.fits, c.peak))


def format_search(found: list[Candidate], gpu_gib: float) -> str:
    lines = [f"{'TP':>3} {'PP':>3} {'DP':>3} {'rollout TP':>10} {'train peak':>11} {'rollout peak':>12}  verdict"]
    for c in found:
        train = max(p.total for p in c.plan.phases if p.name.startswith("training"))
        roll = next(p for p in c.plan.phases if p.name == "rollout")
        why = "fits" if c.plan.fits else "; ".join(c.plan.problems())[:90]
        lines.append(f"{c.tp:>3} {c.pp:>3} {c.plan.summary['dp']:>3} {c.rollout_tp:>10} "
                     f"{train / GIB:>7.1f} GiB {roll.total / GIB:>8.1f} GiB  {why}")
    fitting = sum(c.plan.fits for c in found)
    lines.append(f"{fitting} of {len(found)} valid layouts fit in {gpu_gib:g} GiB per GPU")
    return "\n".join(lines)
