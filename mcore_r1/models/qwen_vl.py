"""Qwen2-VL and Qwen2.5-VL on Megatron-Core: a TP-sharded vision tower plus an mrope GPTModel.

Vision tower (first pipeline stage only, replicated over data parallelism):
  Conv3d patch embedding -> Megatron TransformerLayers (heads and MLP split over TP) with the
  2D rotary embedding -> patch merger (norm, 2x2 merge, TP-split MLP).
  Attention is bidirectional within one image (Qwen2-VL, and Qwen2.5-VL's full-attention
  blocks) or within one window (Qwen2.5-VL's other blocks). Images of different sizes are
  packed into one sequence; a block-diagonal mask keeps them apart.

The language model is `dense.build_language_model` with Megatron's multimodal rotary
embedding; image features replace the embeddings of the image-pad tokens, in order.

`vision_rules` declares the HF <-> Megatron weight correspondence of the tower; with the
dense `language_rules` it is the whole mapping of a VL checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from mcore_r1.models import dense
from mcore_r1.models.mapping import Rule, Transform, copy_transform, gate_up_transform, qkv_transform
from mcore_r1.models.mrope import image_cu_seqlens, vision_patch_positions, window_index


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """Qwen2-VL's vision activation (x * sigmoid(1.702 x))."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"silu": F.silu, "quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass(frozen=True)
class VisionArch:
    family: str
    depth: int
    hidden: int
    heads: int
    ffn: int
    out_hidden: int
    gated: bool
    act: str
    norm: str  # "RMSNorm" (Qwen2.5-VL) or "LayerNorm" (Qwen2-VL)
    patch: int
    temporal_patch: int
    merge: int
    in_channels: int
    rope_theta: float
    window_size: Optional[int]
    full_attention_blocks: Optional[tuple[int, ...]]  # None: every block attends per image

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any], family: str) -> "VisionArch":
        v = hf["vision_config"]
        qwen25 = family == "qwen2_5_vl"
        hidden = v["hidden_size"] if qwen25 else v["embed_dim"]
        return cls(
            family=family, depth=v["depth"], hidden=hidden, heads=v["num_heads"],
            ffn=v["intermediate_size"] if qwen25 else int(hidden * v["mlp_ratio"]),
            out_hidden=v["out_hidden_size"] if qwen25 else v["hidden_size"],
            gated=qwen25, act=v.get("hidden_act", "silu" if qwen25 else "quick_gelu"),
            norm="RMSNorm" if qwen25 else "LayerNorm", patch=v["patch_size"],
            temporal_patch=v.get("temporal_patch_size", 2), merge=v["spatial_merge_size"],
            in_channels=v.get("in_channels", 3),
            rope_theta=(v.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            window_size=v.get("window_size") if qwen25 else None,
            full_attention_blocks=tuple(v.get("fullatt_block_indexes", ())) if qwen25 else None,
        )


def _vision_config(arch: VisionArch, tp: int, dtype: torch.dtype, init_weights: bool = True):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=arch.depth, hidden_size=arch.hidden, num_attention_heads=arch.heads,
        kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn, normalization=arch.norm,
        layernorm_epsilon=1e-6, gated_linear_unit=arch.gated,
        activation_func=ACTIVATIONS[arch.act], add_bias_linear=True, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        perform_initialization=init_weights, **dense.runtime_flags(),
    )


def _vision_layer_spec():
    """The language layer spec with bidirectional attention under an explicit mask."""
    from megatron.core.transformer.enums import AttnMaskType

    spec, _ = dense.layer_spec(qk_layernorm=False)
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.arbitrary}
    return spec


def _norm(kind: str, dim: int, dtype: torch.dtype) -> torch.nn.Module:
    if kind == "RMSNorm":
        return torch.nn.RMSNorm(dim, eps=1e-6, dtype=dtype)
    return torch.nn.LayerNorm(dim, eps=1e-6, dtype=dtype)


def block_diagonal_mask(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """Megatron mask [1, 1, n, n]: True where query and key lie in different segments."""
    segment = torch.bucketize(torch.arange(n), cu_seqlens[1:].to(torch.long), right=True)
    return (segment[:, None] != segment[None, :]).view(1, 1, n, n)


def _module_base():
    # MegatronModule, so that sharded_state_dict() recurses into the TP-split layers below
    # (a plain nn.Module would be saved as replicated local shards).
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class PatchMerger(_module_base()):
    """Norm, concatenate each 2x2 block of patches, then a TP-split two-layer GELU MLP."""

    def __init__(self, config, arch: VisionArch, dtype: torch.dtype):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__(config=config)
        width = arch.hidden * arch.merge**2
        self.width = width
        self.ln_q = _norm(arch.norm, arch.hidden, dtype)
        self.linear_fc1 = ColumnParallelLinear(width, width, config=config, bias=True,
                                               gather_output=False, init_method=config.init_method)
        self.linear_fc2 = RowParallelLinear(width, arch.out_hidden, config=config, bias=True,
                                            input_is_parallel=True, skip_bias_add=False,
                                            init_method=config.output_layer_init_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).reshape(-1, self.width)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))
        return x


class VisionTower(_module_base()):
    """The Qwen-VL vision encoder built from Megatron-Core layers."""

    def __init__(self, arch: VisionArch, tp: int, dtype: torch.dtype, init_weights: bool = True):
        from megatron.core.transformer.transformer_block import TransformerBlock

        config = _vision_config(arch, tp, dtype, init_weights)
        super().__init__(config=config)
        self.arch = arch
        kernel = (arch.temporal_patch, arch.patch, arch.patch)
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv3d(arch.in_channels, arch.hidden, kernel, stride=kernel,
                                                bias=False, dtype=dtype)
        self.decoder = TransformerBlock(config, _vision_layer_spec(), pre_process=True,
                                        post_process=False)
        self.merger = PatchMerger(config, arch, dtype)
        quarter = arch.head_dim // 2
        freqs = 1.0 / (arch.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))
        self.register_buffer("inv_freq", freqs, persistent=False)

    def _rotary(self, grid_thw: torch.Tensor) -> torch.Tensor:
        # Each patch rotates half of each head by its row, the other half by its column.
        pos = vision_patch_positions(grid_thw, self.arch.merge).to(self.inv_freq.device)
        return (pos[..., None].float() * self.inv_freq).flatten(1)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        a = self.arch
        weight = self.patch_embed.proj.weight
        x = pixel_values.to(weight.dtype).view(-1, a.in_channels, a.temporal_patch, a.patch, a.patch)
        x = self.patch_embed.proj(x).view(-1, a.hidden)
        n, unit = x.shape[0], a.merge**2
        rotary = self._rotary(grid_thw)
        full_mask = block_diagonal_mask(image_cu_seqlens(grid_thw), n).to(x.device)
        order = None
        if a.window_size is not None:
            order, window_bounds = window_index(grid_thw, a.merge, a.window_size, a.patch)
            regroup = lambda t: t.reshape(n // unit, unit, -1)[order].reshape(n, -1)  # noqa: E731
            x, rotary = regroup(x), regroup(rotary)
            window_mask = block_diagonal_mask(window_bounds, n).to(x.device)
        emb = torch.cat([rotary, rotary], dim=-1)[:, None, None, :]
        hidden = x.unsqueeze(1)  # Megatron layout [seq, batch=1, hidden]
        for i, layer in enumerate(self.decoder.layers):
            full = a.full_attention_blocks is None or i in a.full_attention_blocks
            hidden, _ = layer(hidden, attention_mask=full_mask if full else window_mask,
                              rotary_pos_emb=emb)
        merged = self.merger(hidden.squeeze(1))
        return merged if order is None else merged[torch.argsort(order)]


class QwenVLModel(_module_base()):
    """Vision tower (first stage) + mrope language model, as one pipeline-stage module."""

    def __init__(self, hf: dict[str, Any], family: str, layout: dense.ModelLayout,
                 dtype: torch.dtype, pre_process: bool, post_process: bool,
                 vp_stage: Optional[int] = None, init_weights: bool = True):
        text = dense.TextArch.from_hf(hf, family)
        language_model = dense.build_language_model(
            text, layout, dtype, pre_process, post_process, vp_stage,
            position_embedding_type="mrope", perform_initialization=init_weights)
        super().__init__(config=language_model.config)
        self.model_type = language_model.model_type  # read by Megatron's schedules
        self.language_model = language_model
        self.pre_process, self.post_process = pre_process, post_process
        self.vision_arch = VisionArch.from_hf(hf, family)
        self.vision_model = (VisionTower(self.vision_arch, layout.tp, dtype, init_weights)
                             if pre_process else None)
        self.image_token_id = hf["image_token_id"]

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def forward(self, input_ids, position_ids, attention_mask, pixel_values=None,
                image_grid_thw=None, labels=None, packed_seq_params=None, image_mask=None):
        decoder_input = None
        if self.pre_process:
            embeds = self.language_model.embedding(input_ids=input_ids, position_ids=None)
            if pixel_values is not None:
                images = self.vision_model(pixel_values, image_grid_thw)
                embeds = scatter_image_features(embeds, input_ids, images, self.image_token_id,
                                                image_mask)
            decoder_input = embeds
        # packed_seq_params (TE "thd" packing on GPU) concerns the language model only: the
        # vision tower already separates images with its own block-diagonal masks.
        return self.language_model(input_ids, position_ids, attention_mask,
                                   decoder_input=decoder_input, labels=labels,
                                   packed_seq_params=packed_seq_params)


def scatter_image_features(embeds: torch.Tensor, input_ids: torch.Tensor, images: torch.Tensor,
                           image_token_id: int, image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Put image features, in order, at the image-pad tokens (batch-major, like transformers).

    `image_mask` (same shape as `input_ids`) restricts that to the prompts' placeholders, so an
    image-pad id the model generated stays a text token, as in vLLM.
    """
    mask = input_ids == image_token_id if image_mask is None else image_mask
    if int(mask.sum()) != images.shape[0]:
        raise ValueError(
            f"image features and image tokens do not match: {int(mask.sum())} image-pad tokens vs "
            f"{images.shape[0]} features; a prompt was truncated, or the pixel bounds used to "
            "build the prompt differ from the processor's (data.min_pixels / data.max_pixels)")
    by_batch = embeds.transpose(0, 1)  # Megatron embeddings are [seq, batch, hidden]
    by_batch = by_batch.masked_scatter(mask.unsqueeze(-1), images.to(by_batch.dtype))
    return by_batch.transpose(0, 1).contiguous()


def fused_qkv_transform(heads: int, head_dim: int) -> Transform:
    """HF's vision `attn.qkv` = [all q; all k; all v] <-> Megatron's per-head grouping."""
    per_head = qkv_transform(heads, heads, head_dim)
    return Transform("qkv", lambda ts: per_head.to_mcore(ts[0].chunk(3, dim=0)),
                     lambda t: [torch.cat(per_head.to_hf(t), dim=0)])


def vision_rules(arch: VisionArch, flavour: str = "local", hf_prefix: str = "visual.",
                 mcore_prefix: str = "vision_model.") -> list[Rule]:
    copy_, qkv = copy_transform(), fused_qkv_transform(arch.heads, arch.head_dim)
    L, H = f"{mcore_prefix}decoder.layers.{{layer}}.", f"{hf_prefix}blocks.{{layer}}."
    attn_norm, mlp_norm = (
        ("self_attention.linear_qkv.layer_norm_", "mlp.linear_fc1.layer_norm_")
        if flavour == "te" else ("input_layernorm.", "pre_mlp_layernorm.")
    )
    norm_params = ("weight",) if arch.norm == "RMSNorm" else ("weight", "bias")
    rules = [Rule(f"{mcore_prefix}patch_embed.proj.weight", (f"{hf_prefix}patch_embed.proj.weight",), copy_)]
    for p in norm_params:
        rules += [
            Rule(L + attn_norm + p, (H + f"norm1.{p}",), copy_),
            Rule(L + mlp_norm + p, (H + f"norm2.{p}",), copy_),
            Rule(f"{mcore_prefix}merger.ln_q.{p}", (f"{hf_prefix}merger.ln_q.{p}",), copy_),
        ]
    for p in ("weight", "bias"):
        rules += [
            Rule(L + f"self_attention.linear_qkv.{p}", (H + f"attn.qkv.{p}",), qkv, 0),
            Rule(L + f"self_attention.linear_proj.{p}", (H + f"attn.proj.{p}",), copy_,
                 1 if p == "weight" else None),
            Rule(f"{mcore_prefix}merger.linear_fc1.{p}", (f"{hf_prefix}merger.mlp.0.{p}",), copy_, 0),
            Rule(f"{mcore_prefix}merger.linear_fc2.{p}", (f"{hf_prefix}merger.mlp.2.{p}",), copy_,
                 1 if p == "weight" else None),
        ]
        if arch.gated:
            rules += [
                Rule(L + f"mlp.linear_fc1.{p}", (H + f"mlp.gate_proj.{p}", H + f"mlp.up_proj.{p}"),
                     gate_up_transform(), 0),
                Rule(L + f"mlp.linear_fc2.{p}", (H + f"mlp.down_proj.{p}",), copy_,
                     1 if p == "weight" else None),
            ]
        else:
            rules += [
                Rule(L + f"mlp.linear_fc1.{p}", (H + f"mlp.fc1.{p}",), copy_, 0),
                Rule(L + f"mlp.linear_fc2.{p}", (H + f"mlp.fc2.{p}",), copy_,
                     1 if p == "weight" else None),
            ]
    return rules
