"""Per-GPU memory of a run as the trainer lays it out, from the config and the HF config alone.

A hybrid worker (`mcore_r1.workers.hybrid`) holds, on one GPU, at the same time:
its Megatron actor stage (bf16 weights, the fp32 gradient buffer, the distributed optimizer's
fp32 state), the frozen reference when `kl_coef > 0`, the critic for PPO, and its vLLM shard,
which sleeps (weights copied to host, KV cache freed; vLLM sleep level 1) while Megatron
trains. So two peaks are checked:

* training: resident Megatron state + the activations of the micro-batches a pipeline stage
  keeps for backward + the last stage's logits, with vLLM asleep;
* rollout: resident Megatron state + vLLM's budget `rollout.gpu_memory_utilization x total`
  (vLLM refuses to start or wake unless that much is free), of which weights and activations
  come first and the rest is KV cache, which must hold at least one longest sequence.

Bytes per parameter (Megatron's distributed optimizer, `docs/source/distrib_optimizer.md` in
Megatron-LM: "bf16 param, fp32 grads: 6 + 12/d"): weights 2 (bf16), gradient buffer 4 (fp32,
`grad_reduce_in_fp32=True` in `build_optimizer`), optimizer 12 / (DP x CP) (fp32 master copy +
Adam's two moments, sharded over the data-parallel ranks); `trainer.optimizer_offload_fraction`
moves that share of the 12 bytes to host memory. Frozen parameters (`freeze_vision_tower`) get
neither gradient nor optimizer state.

Every formula is in the docstring of the function that evaluates it; constants that are
estimates rather than arithmetic (`RESERVE_GIB`, vLLM's activation peak) say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mcore_r1.config.schema import Config
from mcore_r1.models.mapping import padded_vocab_size
from mcore_r1.plan import params as P

GIB = 2 ** 30
# CUDA context, cuBLAS/NCCL workspaces, the caching allocator's fragmentation and what a
# sleeping vLLM keeps (its CUDA graphs pool, buffers): an estimate, not arithmetic.
RESERVE_GIB = 4.0


@dataclass
class Item:
    name: str
    bytes: float
    formula: str


@dataclass
class Phase:
    """One memory peak of one pipeline stage: its items and whether they fit."""

    name: str
    items: list[Item]
    budget: float                                       # bytes usable on one GPU
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # failures other than the total

    @property
    def total(self) -> float:
        return sum(i.bytes for i in self.items)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget and not self.problems


@dataclass
class Plan:
    summary: dict[str, Any]
    phases: list[Phase]
    host_per_node: float

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.phases)

    def problems(self) -> list[str]:
        out = []
        for p in self.phases:
            if p.total > p.budget:
                out.append(f"{p.name}: needs {p.total / GIB:.1f} GiB > {p.budget / GIB:.1f} GiB usable")
            out += [f"{p.name}: {msg}" for msg in p.problems]
        return out


def param_bytes(dtype: str) -> int:
    """2 for bf16/fp16 (and `auto`, which is bf16 on GPU), 4 for fp32."""
    return 4 if dtype == "float32" else 2


def model_state(n_params: int, n_trainable: int, dp_cp: int, dtype: str, offload: float) -> list[Item]:
    """weights = N x p; grads = N_train x 4; optimizer = N_train x (m + 8) / (DP x CP) x (1 - f),
    with p bytes per weight, m = 4 for the fp32 master copy of 16-bit weights (0 for fp32)."""
    p = param_bytes(dtype)
    opt = n_trainable * ((4 if p < 4 else 0) + 8) / dp_cp
    return [Item("weights", n_params * p, f"{n_params / 1e9:.3f}B x {p} B"),
            Item("gradients (fp32 buffer)", n_trainable * 4, f"{n_trainable / 1e9:.3f}B x 4 B"),
            Item("optimizer (fp32 master + Adam m, v)", opt * (1 - offload),
                 f"{n_trainable / 1e9:.3f}B x {(4 if p < 4 else 0) + 8} B / {dp_cp} (DP x CP)"
                 + (f" x (1 - {offload:g} offloaded)" if offload else ""))]


def layer_activation_bytes(a, tp: int) -> float:
    """Bytes one token leaves on one language layer for backward (bf16, no recomputation).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    arXiv:2205.05198, sec. 4.1) count 34 s b h for GPT; the same accounting for this model
    (flash/fused attention, so no s^2 term; no dropout masks; GQA; SwiGLU; no sequence
    parallelism, which the trainer does not enable):
        8h                         the two norms' inputs and outputs, replicated over TP
      + [2(a+2g)d                  fused QKV output (kept alive by the value view)
         + 2(a+g)d                 query and key after RoPE
         + 2ad + 4a                attention output, softmax log-sum-exp (fp32)
         + 4f + 2f] / t            fc1 output (gate, up) and SwiGLU output
    With full recomputation only the layer input (2h) would stay per layer.
    """
    h, d, heads, g, f = a.hidden_size, a.head_dim, a.num_heads, a.num_groups, a.ffn_hidden_size
    sharded = 2 * (heads + 2 * g) * d + 2 * (heads + g) * d + 2 * heads * d + 4 * heads + 6 * f
    return 8 * h + sharded / tp


def logits_bytes(vocab_padded: int, tp: int, temperature: float, entropy: bool) -> float:
    """Bytes per token of the last stage's loss: bf16 logits (2) + their fp32 copy that
    Megatron's vocab-parallel cross entropy turns into softmax in place and keeps (4) + the fp32
    gradient in backward (4), over V_pad / t columns; +2 when a temperature divides the logits,
    +8 for the entropy term's fp32 copies."""
    per_col = 10 + (2 if temperature not in (0.0, 1.0) else 0) + (8 if entropy else 0)
    return per_col * vocab_padded / tp


def sequences_per_micro_batch(cfg: Config) -> int:
    """Full-length sequences (longest prompt + longest response) in one token budget."""
    return max(1, cfg.trainer.micro_batch_tokens // (cfg.data.max_prompt_length + cfg.rollout.max_new_tokens))


def vision_patches(cfg: Config, v) -> int:
    """Patches in one micro-batch, assuming full-length sequences, one image each, at
    `data.max_pixels` (capped by the prompt length in image tokens; a token = merge^2 patches)."""
    tokens_per_image = min(cfg.data.max_pixels // (v.patch * v.merge) ** 2, cfg.data.max_prompt_length)
    return sequences_per_micro_batch(cfg) * tokens_per_image * v.merge ** 2


def vision_activation_bytes(v, tp: int, n: int, frozen: bool) -> tuple[float, str]:
    """Vision tower activations of one micro-batch with n patches.

    The tower packs every image of the micro-batch into one sequence with an explicit
    block-diagonal mask (`qwen_vl.VisionTower`), which fused flash kernels do not take, so
    attention is the unfused path: each layer keeps its softmax, heads/t x n^2 x 2 bytes,
    quadratic in all the micro-batch's patches. Per patch and layer otherwise (as for the
    language layers, MHA, gated MLP): 8 h_v + (12 h_v + 6 f_v) / t. Both masks: 2 n^2 bytes.
    Frozen tower: nothing is kept; one layer's scores and softmax (4 heads/t n^2) are transient.
    """
    heads = v.heads // tp
    if frozen:
        return 4 * heads * n * n + 2 * n * n, f"frozen: one layer's scores, {n} patches"
    per_patch = 8 * v.hidden + (12 * v.hidden + 6 * v.ffn) / tp
    total = v.depth * (n * per_patch + 2 * heads * n * n) + 2 * n * n
    return total, f"{v.depth} blocks x ({n} patches x {per_patch:.0f} B + {heads} heads x {n}^2 x 2 B)"


def in_flight_micro_batches(cfg: Config, dp: int, stage: int) -> int:
    """1F1B keeps pp - stage micro-batches' activations on stage `stage` (at most as many as a
    DP rank's mini-batch share has: responses / DP x sequence length / token budget)."""
    per_rank_tokens = cfg.trainer.mini_batch_size / dp * (cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)
    return max(1, min(cfg.parallel.pp - stage, math.ceil(per_rank_tokens / cfg.trainer.micro_batch_tokens)))


def vllm_serving_limits(gpu_gib: float) -> tuple[int, int]:
    """vLLM's offline defaults (max_num_batched_tokens, max_num_seqs): 16384 / 1024 on
    >= 70 GiB GPUs (its H100/H200 rule), 8192 / 256 otherwise (vllm/engine/arg_utils.py)."""
    return (16384, 1024) if gpu_gib >= 70 else (8192, 256)


def vllm_activation_bytes(a, tp: int, gpu_gib: float) -> float:
    """vLLM's profiling peak (an estimate): one forward of max_num_batched_tokens tokens, about
    2 (4h + 3f/t) bytes each inside the widest layer, plus the sampler's fp32 logits of
    max_num_seqs sequences over the full vocabulary, twice (logits and probabilities)."""
    tokens, seqs = vllm_serving_limits(gpu_gib)
    return tokens * 2 * (4 * a.hidden_size + 3 * a.ffn_hidden_size / tp) + seqs * a.vocab_size * 8


def kv_bytes_per_token(hf: dict[str, Any], tp: int) -> int:
    """2 (K and V) x layers x KV heads per rank x head_dim x 2 bytes (bf16 cache)."""
    a = P.text_arch(hf)
    return 2 * a.num_layers * P.kv_heads_per_rank(hf, tp) * a.head_dim * 2


def plan(cfg: Config, hf: dict[str, Any], reserve_gib: float = RESERVE_GIB) -> Plan:
    """The training peak of every pipeline stage and the rollout peak (see the module doc)."""
    par, t, r, alg = cfg.parallel, cfg.trainer, cfg.rollout, cfg.algorithm
    world = t.nnodes * t.devices_per_node
    dp = world // (par.tp * par.pp * par.cp)
    a, v = P.text_arch(hf), P.vision_arch(hf)
    budget = (t.gpu_memory_gib - reserve_gib) * GIB
    dtype = cfg.model.dtype
    phases, resident_max = [], 0.0
    for stage in sorted({0, par.pp - 1}):
        sp = P.stage_params(hf, par.tp, par.pp, stage)
        frozen = P.frozen_params(hf, par.tp, stage, cfg.model.freeze_vision_tower)
        state = model_state(sp.total, sp.total - frozen, dp * par.cp, dtype, t.optimizer_offload_fraction)
        items = list(state)
        if alg.kl_coef > 0:
            items.append(Item("reference weights (kl_coef > 0)", sp.total * param_bytes(dtype),
                              f"{sp.total / 1e9:.3f}B x {param_bytes(dtype)} B"))
        if alg.use_critic:
            items += [Item(f"critic {i.name}", i.bytes, i.formula) for i in state]
        resident = sum(i.bytes for i in items)
        resident_max = max(resident_max, resident)
        flight = in_flight_micro_batches(cfg, dp, stage)
        tokens = t.micro_batch_tokens / par.cp
        per_token = layer_activation_bytes(a, par.tp)
        items.append(Item("activations", flight * tokens * sp.layers * per_token,
                          f"{flight} micro-batch(es) x {tokens:.0f} tokens x {sp.layers} layers x "
                          f"{per_token:.0f} B (full recompute would keep {2 * a.hidden_size} B/layer)"))
        if stage == par.pp - 1:
            per = logits_bytes(padded_vocab_size(a.vocab_size, par.tp), par.tp, r.temperature,
                               bool(alg.entropy_coeff))
            items.append(Item("logits and loss", tokens * per, f"{tokens:.0f} tokens x {per:.0f} B"))
        if stage == 0 and v is not None:
            n = vision_patches(cfg, v)
            vb, how = vision_activation_bytes(v, par.tp, n, cfg.model.freeze_vision_tower)
            items.append(Item("vision tower activations", vb * (1 if cfg.model.freeze_vision_tower else flight),
                              f"{flight} x {how}"))
        phases.append(Phase(f"training, stage {stage}/{par.pp}", items, budget))
    phases.append(rollout_phase(cfg, hf, resident_max, budget))
    host = host_bytes_per_node(cfg, hf, dp)
    summary = dict(world=world, dp=dp, tp=par.tp, pp=par.pp, cp=par.cp, rollout_tp=r.tp,
                   replicas=world // r.tp, params=P.total_params(hf), gpu_gib=t.gpu_memory_gib,
                   reserve_gib=reserve_gib)
    return Plan(summary, phases, host)


def rollout_phase(cfg: Config, hf: dict[str, Any], resident: float, budget: float) -> Phase:
    """Megatron's resident state + vLLM's utilization budget, split into weights, activation
    peak and KV cache; the KV cache must hold one longest sequence (vLLM refuses otherwise)."""
    t, r, d = cfg.trainer, cfg.rollout, cfg.data
    a, total = P.text_arch(hf), t.gpu_memory_gib * GIB
    vllm_budget = r.gpu_memory_utilization * total
    weights = P.vllm_weight_params(hf, r.tp) * param_bytes(cfg.model.dtype)
    act = vllm_activation_bytes(a, r.tp, t.gpu_memory_gib)
    kv = vllm_budget - weights - act
    per_token = kv_bytes_per_token(hf, r.tp)
    max_len = d.max_prompt_length + r.max_new_tokens
    replicas = t.nnodes * t.devices_per_node // r.tp
    seqs = math.ceil(d.prompts_per_step * r.n / replicas)
    capacity = max(0.0, kv) / per_token
    items = [Item("Megatron resident state", resident, "weights + gradients + optimizer (+ reference)"),
             Item("vLLM weights", weights, f"{P.vllm_weight_params(hf, r.tp) / 1e9:.3f}B at rollout TP {r.tp}"),
             Item("vLLM activation peak (estimate)", act, "see vllm_activation_bytes"),
             Item("vLLM KV cache", max(0.0, kv),
                  f"{r.gpu_memory_utilization:g} x {t.gpu_memory_gib:g} GiB - weights - activations; "
                  f"{per_token} B/token = {capacity:,.0f} tokens")]
    phase = Phase("rollout", items, budget)
    need_one = per_token * max_len
    if kv < need_one:
        phase.problems.append(
            f"vLLM KV cache {max(kv, 0) / GIB:.2f} GiB cannot hold one sequence of {max_len} tokens "
            f"({need_one / GIB:.2f} GiB): raise rollout.gpu_memory_utilization or rollout.tp")
    in_flight = min(1.0, capacity / (seqs * max_len))
    phase.notes.append(f"{seqs} sequences per replica per step; {in_flight:.0%} of them fit in the KV "
                       f"cache at full length {max_len} (the rest wait for free blocks)")
    limit = (budget - resident) / total
    phase.notes.append(f"largest rollout.gpu_memory_utilization next to Megatron's state: {limit:.2f}")
    return phase


def host_bytes_per_node(cfg: Config, hf: dict[str, Any], dp: int) -> float:
    """Host memory the GPUs of one node park there: the offloaded optimizer share
    (12 B x trainable / (DP x CP) x f per rank) and vLLM's weights while it sleeps."""
    par, t, r = cfg.parallel, cfg.trainer, cfg.rollout
    per_rank = 0.0
    if t.optimizer_offload_fraction:
        sp = P.stage_params(hf, par.tp, par.pp, 0)
        per_rank += sp.total * 12 / (dp * par.cp) * t.optimizer_offload_fraction
    per_rank += P.vllm_weight_params(hf, r.tp) * param_bytes(cfg.model.dtype)
    return per_rank * t.devices_per_node
