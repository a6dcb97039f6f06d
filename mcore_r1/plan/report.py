"""The planner's printed report: one table per memory peak, then the verdict."""

from __future__ import annotations

from mcore_r1.plan.memory import GIB, Plan


def gib(n: float) -> str:
    return f"{n / GIB:7.2f} GiB"


def format_plan(plan: Plan, title: str = "") -> str:
    s = plan.summary
    lines = [
        f"plan{': ' + title if title else ''}",
        f"  model: {s['params'] / 1e9:.2f}B parameters; world {s['world']} = DP {s['dp']} x TP {s['tp']}"
        f" x PP {s['pp']} x CP {s['cp']}; rollout: {s['replicas']} vLLM replica(s) of TP {s['rollout_tp']}",
        f"  GPU: {s['gpu_gib']:g} GiB, of which {s['reserve_gib']:g} GiB reserved (CUDA context, "
        "NCCL/cuBLAS workspaces, fragmentation, sleeping vLLM)",
    ]
    for phase in plan.phases:
        verdict = "fits" if phase.fits else "DOES NOT FIT"
        lines.append(f"\n  {phase.name}: {gib(phase.total)} of {gib(phase.budget)} usable -> {verdict}")
        width = max(len(i.name) for i in phase.items)
        for item in phase.items:
            lines.append(f"    {item.name:<{width}}  {gib(item.bytes)}   {item.formula}")
        lines += [f"    ! {p}" for p in phase.problems]
        lines += [f"    - {n}" for n in phase.notes]
    lines.append(f"\n  host memory per node (offloaded optimizer state, sleeping vLLM weights): "
                 f"{plan.host_per_node / GIB:.0f} GiB")
    lines.append("\nverdict: " + ("fits" if plan.fits else "does not fit: " + "; ".join(plan.problems())))
    return "\n".join(lines)
