"""Dense decoder language models (Qwen2/Qwen2.5, Qwen3, Llama 3) as Megatron-Core GPTModels.

All three are the same Megatron block (pre-norm RMSNorm, GQA attention with RoPE, SwiGLU MLP)
with per-family switches read from the HF config: QKV bias (Qwen2), q/k RMSNorm (Qwen3), rope
scaling (Llama 3), tied or untied embeddings. The vision-language families reuse
`build_language_model` and `language_rules` for their language half.

The HF <-> Megatron weight correspondence is declared once in `language_rules`; the converter,
the logit checks and the rollout refit all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from mcore_r1.models import rope
from mcore_r1.models.mapping import (
    Rule, copy_transform, gate_up_transform, padded_vocab_size, qkv_transform, vocab_transform,
)
from mcore_r1.models.registry import text_config
from mcore_r1.parallel import device as devmod


@dataclass(frozen=True)
class TextArch:
    """The language-model facts of an HF config that decide the Megatron model."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tied: bool
    max_positions: int
    rope: dict

    @classmethod
    def from_hf(cls, hf: dict[str, Any], family: str) -> "TextArch":
        text = text_config(hf)
        heads = text["num_attention_heads"]
        return cls(
            num_layers=text["num_hidden_layers"],
            hidden_size=text["hidden_size"],
            num_heads=heads,
            num_groups=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            ffn_hidden_size=text["intermediate_size"],
            vocab_size=text["vocab_size"],
            norm_eps=text.get("rms_norm_eps", 1e-6),
            # Qwen2 (and the Qwen2-VL language models) always carry q/k/v biases.
            qkv_bias=family in ("qwen2", "qwen2_vl", "qwen2_5_vl") or bool(text.get("attention_bias")),
            qk_norm=family == "qwen3",
            tied=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            max_positions=text.get("max_position_embeddings", 4096),
            rope=rope.rope_parameters(text),
        )


@dataclass(frozen=True)
class ModelLayout:
    """How one model is cut: TP/PP/CP sizes and, optionally, uneven first/last PP stages."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None


def check_pipeline_split(num_layers: int, layout: ModelLayout) -> None:
    """Refuse splits Megatron cannot build, with the arithmetic (uneven first/last allowed)."""
    first, last, pp = layout.first_stage_layers, layout.last_stage_layers, layout.pp
    if pp == 1:
        return
    middle_stages = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if rest < 0 or (middle_stages == 0 and rest != 0) or (middle_stages and rest % middle_stages):
        raise ValueError(
            f"cannot split {num_layers} layers over PP={pp}: first stage {first}, last stage "
            f"{last}, leaving {rest} layers for {middle_stages} other stage(s); the remaining "
            "stages must get equal counts (set first/last stage layer counts to absorb the rest)"
        )


def runtime_flags() -> dict:
    """TransformerConfig settings that depend on the machine, not on the model."""
    on_gpu = devmod.cuda_available()
    return dict(
        use_cpu_initialization=not on_gpu,
        # The fused kernels below exist only as CUDA extensions.
        bias_dropout_fusion=on_gpu, apply_rope_fusion=False, masked_softmax_fusion=on_gpu,
        gradient_accumulation_fusion=False, persist_layer_norm=on_gpu,
    )


def transformer_config(arch: TextArch, layout: ModelLayout, dtype: torch.dtype, **overrides):
    from megatron.core.transformer import TransformerConfig

    check_pipeline_split(arch.num_layers, layout)
    kwargs = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_groups,
        kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=arch.norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        **runtime_flags(),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(qk_layernorm: bool):
    """TransformerEngine layers when TE and CUDA are present, Megatron's local layers otherwise
    (their core attention taught to attend within each packed sequence, `segment_attention`).

    Returns (spec, flavour); the flavour decides where the pre-attention / pre-MLP norms live
    (fused into the following linear in TE, separate modules in the local spec).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if devmod.cuda_available() and devmod.transformer_engine_available():
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm), "te"
    from mcore_r1.models.segment_attention import SegmentedDotProductAttention

    spec = specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SegmentedDotProductAttention
    return spec, "local"


def build_language_model(
    arch: TextArch,
    layout: ModelLayout,
    dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    position_embedding_type: str = "rope",
    **config_overrides,
):
    """A Megatron GPTModel for this rank's pipeline stage, with HF-exact rotary frequencies."""
    from megatron.core.models.gpt import GPTModel

    if position_embedding_type == "mrope":
        config_overrides.setdefault("mrope_section", list(arch.rope["mrope_section"]))
    config = transformer_config(arch, layout, dtype, **config_overrides)
    spec, _ = layer_spec(arch.qk_norm)
    model = GPTModel(
        config, spec, vocab_size=padded_vocab_size(arch.vocab_size, layout.tp),
        max_sequence_length=arch.max_positions, pre_process=pre_process,
        post_process=post_process, share_embeddings_and_output_weights=arch.tied,
        position_embedding_type=position_embedding_type,
        rotary_base=int(arch.rope["rope_theta"]), vp_stage=vp_stage,
    )
    rope.install_inv_freq(model, rope.inv_freq(arch.head_dim, arch.rope))
    return model


def language_rules(arch: TextArch, tp: int, flavour: str = "local", hf_prefix: str = "model.",
                   mcore_prefix: str = "", lm_head: str = "lm_head.weight") -> list[Rule]:
    """HF <-> Megatron rules for a dense language model (see `mapping` for the transforms)."""
    copy = copy_transform()
    vocab = vocab_transform(arch.vocab_size, padded_vocab_size(arch.vocab_size, tp))
    qkv = qkv_transform(arch.num_heads, arch.num_groups, arch.head_dim)
    L, H = f"{mcore_prefix}decoder.layers.{{layer}}.", f"{hf_prefix}layers.{{layer}}."
    attn_norm, mlp_norm = (
        ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")
        if flavour == "te" else ("input_layernorm.weight", "pre_mlp_layernorm.weight")
    )
    q, k, v = (f"{H}self_attn.{p}_proj" for p in "qkv")
    rules = [
        Rule(f"{mcore_prefix}embedding.word_embeddings.weight", (f"{hf_prefix}embed_tokens.weight",), vocab, 0),
        Rule(f"{mcore_prefix}decoder.final_layernorm.weight", (f"{hf_prefix}norm.weight",), copy),
        Rule(L + attn_norm, (H + "input_layernorm.weight",), copy),
        Rule(L + "self_attention.linear_qkv.weight", (f"{q}.weight", f"{k}.weight", f"{v}.weight"), qkv, 0),
        Rule(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), copy, 1),
        Rule(L + mlp_norm, (H + "post_attention_layernorm.weight",), copy),
        Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
             gate_up_transform(), 0),
        Rule(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), copy, 1),
    ]
    if arch.qkv_bias:
        rules.append(Rule(L + "self_attention.linear_qkv.bias",
                          (f"{q}.bias", f"{k}.bias", f"{v}.bias"), qkv, 0))
    if arch.qk_norm:
        rules += [Rule(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), copy),
                  Rule(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), copy)]
    # Tied: the last pipeline stage still holds its own copy of the embedding as output_layer
    # (Megatron keeps the two in sync); it is loaded from the embedding and never exported.
    head_source = f"{hf_prefix}embed_tokens.weight" if arch.tied else lm_head
    rules.append(Rule(f"{mcore_prefix}output_layer.weight", (head_source,), vocab, 0))
    return rules


def is_tied_output(rule: Rule, arch: TextArch) -> bool:
    """Rules not to export: the tied output layer duplicates the embedding."""
    return arch.tied and rule.mcore.endswith("output_layer.weight")
