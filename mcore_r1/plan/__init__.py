"""Planning a run before it starts: parameter counts (`params`), per-GPU memory (`memory`),
layout search (`search`), the printed report (`report`), and the full-size shape simulation of
the Megatron model and its weight mapping on the meta device (`simulate`).

Entry point: `tools/plan.py +experiment=NAME [overrides] [--search] [--simulate]`.
"""
