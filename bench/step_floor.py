"""The least time one GRPO step of the e2e benchmark can take on this machine.

An RL step's work is fixed by its shape: decode `new_tokens` tokens for every response, run the
reference and the policy (forward + backward) over every token once, and take one Adam step.
This script measures, in the same run, the two machine limits that bound that work:

- GEMM throughput: the best of torch's matmul and oneDNN's (`parallel.cpu_gemm`) on a
  [tokens, hidden] x [hidden, ffn] product of the model's own shape, on all cores;
- memory read bandwidth: a sum over a 1 GiB tensor (decoding a batch reads every weight
  once per decode step; Adam reads and writes its state once per step).

and prints the floor: linear-layer FLOPs at that throughput plus bytes at that bandwidth.
Attention scores, norms, activations, sampling and every fixed cost count as zero, so no
implementation can be faster than the floor here, ours and TRL's included. The e2e benchmark
prints it beside both measured step times.

The counted tokens are the fewest any trainer must process: each group's prompt once and its
`n` responses (mcore_r1's shared-prompt packing reaches that; TRL repeats the prompt per
response).

  ./run.sh python bench/step_floor.py [--model-dir DIR] [--prompt-tokens 41]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StepShape:
    prompts: int = 8
    responses: int = 4  # per prompt
    new_tokens: int = 64
    prompt_tokens: float = 41.0  # mean


def linear_params(hf: dict) -> int:
    """Weights multiplied per token: attention and MLP projections of every layer, and the LM
    head (tied or not, it is a [hidden, vocab] GEMM)."""
    h, layers = hf["hidden_size"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or h // hf["num_attention_heads"]
    q = hf["num_attention_heads"] * head_dim
    kv = hf.get("num_key_value_heads", hf["num_attention_heads"]) * head_dim
    attention = h * q + 2 * h * kv + q * h
    mlp = 3 * h * hf["intermediate_size"]
    return layers * (attention + mlp) + h * hf["vocab_size"]


def all_params(hf: dict) -> int:
    embedding = 0 if hf.get("tie_word_embeddings") else hf["vocab_size"] * hf["hidden_size"]
    return linear_params(hf) + embedding


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up: first-touch page faults, oneDNN primitive creation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_gflops(hf: dict, dtype: torch.dtype = torch.float32, tokens: int = 1024) -> dict[str, float]:
    """GFLOPS of `x @ W.T` for the model's MLP up-projection shape, per kernel."""
    from mcore_r1.parallel import cpu_gemm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hf["hidden_size"], generator=gen).to(dtype)
    w = torch.randn(hf["intermediate_size"], hf["hidden_size"], generator=gen).to(dtype)
    flops = 2 * tokens * w.shape[0] * w.shape[1]
    kernels = {"torch": lambda: torch.nn.functional.linear(x, w)}
    # both kernels, whichever `auto` picks here: the floor is the machine's, not our choice's
    if cpu_gemm._onednn_problem() is None and (dtype == torch.float32 or cpu_gemm.bf16_supported()):
        kernels["onednn"] = lambda: cpu_gemm._onednn_linear(x, w, None)
    return {name: flops / _best_seconds(fn) / 1e9 for name, fn in kernels.items()}


def read_gbs(nbytes: int = 1 << 30) -> float:
    data = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _best_seconds(lambda: data.sum(), repeats=3) / 1e9


def floor_seconds(hf: dict, shape: StepShape, gflops: float, gbs: float,
                  dtype_bytes: int = 4) -> dict[str, float]:
    """Per-phase floor of one step (seconds) at `gflops` and `gbs`."""
    linear = linear_params(hf)
    prompt_tokens = shape.prompts * shape.prompt_tokens
    tokens = prompt_tokens + shape.prompts * shape.responses * shape.new_tokens
    flop_s = gflops * 1e9
    generated = shape.prompts * shape.responses * shape.new_tokens
    return {
        # every token passes every weight once (prefill and decode alike), and each decode step
        # reads every weight once for the whole batch: the slower of the two bounds
        "generation": max(2 * linear * (prompt_tokens + generated) / flop_s,
                          linear * dtype_bytes * shape.new_tokens / (gbs * 1e9)),
        "reference": 2 * linear * tokens / flop_s,
        "update": 6 * linear * tokens / flop_s,
        # Adam: read weight, grad, two moments; write weight and moments (float32 state)
        "optimizer": all_params(hf) * 4 * 7 / (gbs * 1e9),
    }


def measure(hf: dict, shape: StepShape) -> dict:
    """Machine limits and the floor, measured now."""
    gemm = gemm_gflops(hf)
    bandwidth = read_gbs()
    phases = floor_seconds(hf, shape, max(gemm.values()), bandwidth)
    return {"gemm_gflops": gemm, "read_gbs": bandwidth, "phases": phases,
            "total": sum(phases.values()), "threads": torch.get_num_threads()}


def describe(result: dict) -> str:
    gemm = ", ".join(f"{k} {v:.0f}" for k, v in result["gemm_gflops"].items())
    phases = ", ".join(f"{k} {v:.2f}" for k, v in result["phases"].items())
    return (f"machine limits ({result['threads']} threads): float32 GEMM GFLOPS {gemm}; "
            f"memory read {result['read_gbs']:.1f} GB/s\n"
            f"step floor at those limits: {result['total']:.2f} s ({phases})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="HF model directory (default: the e2e bench's 0.4b "
                                            "shape, read from its config)")
    parser.add_argument("--prompt-tokens", type=float, default=StepShape.prompt_tokens)
    args = parser.parse_args()
    if args.model_dir:
        hf = json.loads((Path(args.model_dir) / "config.json").read_text())
    else:
        from e2e_vs_trl import SHAPE_0_4B

        hf = dict(SHAPE_0_4B, vocab_size=2048, tie_word_embeddings=True)
    shape = StepShape(prompt_tokens=args.prompt_tokens)
    print(f"step: {shape}; {linear_params(hf) / 1e6:.1f}M weights multiplied per token")
    print(describe(measure(hf, shape)))


if __name__ == "__main__":
    main()
