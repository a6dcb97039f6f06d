"""Parameter counts of one Megatron rank, computed from the HF config alone.

The counts follow the modules `mcore_r1.models.builder.build_model` creates, tensor by tensor
(the shape simulation, `mcore_r1.plan.simulate`, checks them against the model built on the
meta device), so the planner's memory figures start from exact numbers:

  language layer (TP = t, heads a, KV groups g, head dim d, hidden h, MLP f):
      linear_qkv   (a + 2g) d / t x h   (+ (a + 2g) d / t bias for the Qwen2 family)
      linear_proj  h x a d / t
      linear_fc1   2 f / t x h          (gate and up, SwiGLU)
      linear_fc2   h x f / t
      norms        2 h                  (+ 2 d for Qwen3's q/k norms), replicated over TP
  first stage:  word embedding  V_pad / t x h   (V padded to a multiple of t)
  last stage:   final norm h, output layer V_pad / t x h (absent only when the embedding is
                tied and one stage holds both ends)
  vision tower (first stage, Qwen-VL): patch embedding, `depth` blocks, patch merger; every
                matrix split over TP like the language layers, biases of row-parallel layers
                and norms replicated.

`total_params(hf)` is the model's size as published (TP = PP = 1, a tied head counted once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from mcore_r1.models.builder import family_of
from mcore_r1.models.dense import TextArch
from mcore_r1.models.mapping import padded_vocab_size


@dataclass(frozen=True)
class StageParams:
    """Parameters one rank of pipeline stage `stage` holds (elements, not bytes)."""

    stage: int
    layers: int             # language layers on this stage
    language: int           # language layers + embedding/output/final norm on this stage
    vision: int             # vision tower (first stage of a VL model), 0 elsewhere

    @property
    def total(self) -> int:
        return self.language + self.vision


def text_arch(hf: dict[str, Any]) -> TextArch:
    return TextArch.from_hf(hf, family_of(hf))


def vision_arch(hf: dict[str, Any]):
    if "vision_config" not in hf:
        return None
    from mcore_r1.models.qwen_vl import VisionArch

    return VisionArch.from_hf(hf, family_of(hf))


def language_layer_params(a: TextArch, tp: int) -> int:
    qkv_rows = (a.num_heads + 2 * a.num_groups) * a.head_dim // tp
    n = qkv_rows * a.hidden_size + a.hidden_size * a.num_heads * a.head_dim // tp
    n += 3 * a.ffn_hidden_size // tp * a.hidden_size
    n += 2 * a.hidden_size + (qkv_rows if a.qkv_bias else 0) + (2 * a.head_dim if a.qk_norm else 0)
    return n


def vision_params(v, tp: int) -> int:
    """The Qwen-VL tower of `mcore_r1.models.qwen_vl.VisionTower` on one TP rank."""
    hid, ffn = v.hidden, v.ffn
    norm = hid if v.norm == "RMSNorm" else 2 * hid  # LayerNorm has a bias too
    block = 3 * hid // tp * (hid + 1) + hid * hid // tp + hid + 2 * norm
    fc1_rows = (2 if v.gated else 1) * ffn // tp
    block += fc1_rows * (hid + 1) + hid * ffn // tp + hid
    width = hid * v.merge ** 2
    merger = norm + width // tp * (width + 1) + v.out_hidden * width // tp + v.out_hidden
    patch = v.in_channels * v.temporal_patch * v.patch ** 2 * hid
    return patch + v.depth * block + merger


def stage_layer_counts(num_layers: int, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None) -> list[int]:
    """Layers per pipeline stage as Megatron assigns them (even, or uneven first/last)."""
    if pp == 1:
        return [num_layers]
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    each = rest // middle if middle else 0
    counts = [each] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def stage_params(hf: dict[str, Any], tp: int, pp: int, stage: int) -> StageParams:
    """Parameters of one rank of `stage` (every TP rank of a stage holds the same count)."""
    a = text_arch(hf)
    layers = stage_layer_counts(a.num_layers, pp)[stage]
    vocab_rows = padded_vocab_size(a.vocab_size, tp) // tp
    n = layers * language_layer_params(a, tp)
    first, last = stage == 0, stage == pp - 1
    if first:
        n += vocab_rows * a.hidden_size
    if last:
        n += a.hidden_size
        if not (a.tied and first):
            n += vocab_rows * a.hidden_size
    v = vision_arch(hf)
    return StageParams(stage, layers, n, vision_params(v, tp) if v is not None and first else 0)


def total_params(hf: dict[str, Any]) -> int:
    """The published size: every parameter once (TP = PP = 1)."""
    return stage_params(hf, 1, 1, 0).total


def frozen_params(hf: dict[str, Any], tp: int, stage: int, freeze_vision: bool) -> int:
    """Parameters of this rank that get no gradient and no optimizer state."""
    v = vision_arch(hf)
    return vision_params(v, tp) if (freeze_vision and v is not None and stage == 0) else 0


def vllm_weight_params(hf: dict[str, Any], tp: int) -> int:
    """Parameters one vLLM rank holds at rollout TP `tp`.

    vLLM shards like Megatron except that KV heads are replicated when `tp` exceeds their
    number (each rank keeps ceil(g / tp) >= 1 of them) and the tied head is stored once.
    """
    a = text_arch(hf)
    kv_per_rank = max(1, math.ceil(a.num_groups / tp))
    q_rows = a.num_heads * a.head_dim // tp
    layer = (q_rows + 2 * kv_per_rank * a.head_dim) * (a.hidden_size + (1 if a.qkv_bias else 0))
    layer += a.hidden_size * q_rows + 3 * a.ffn_hidden_size // tp * a.hidden_size
    layer += 2 * a.hidden_size + (2 * a.head_dim if a.qk_norm else 0)
    vocab_rows = math.ceil(a.vocab_size / tp)
    n = a.num_layers * layer + vocab_rows * a.hidden_size * (1 if a.tied else 2) + a.hidden_size
    v = vision_arch(hf)
    return n + (vision_params(v, tp) if v is not None else 0)


def kv_heads_per_rank(hf: dict[str, Any], tp: int) -> int:
    return max(1, math.ceil(text_arch(hf).num_groups / tp))
