"""The smoke job: what `python -m mcore_r1.main` runs until the RL trainer exists (issue #8).

It proves the stack end to end on this machine: builds (or finds) the configured tiny model
offline, brings up a one-process gloo world with Megatron's parallel groups and the CPU
compatibility layer, builds a Megatron-Core GPTModel with the checkpoint's language-model shape
(random weights: HF -> Megatron weight conversion arrives with issue #4), runs one forward
pass over a chat-templated prompt and reports the logits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from mcore_r1.config.schema import Config
from mcore_r1.config.validate import resolve_model_dir
from mcore_r1.models.registry import ModelShape, read_hf_config

BANNER = (
    "mcore_r1 smoke job: the RL trainer is not implemented yet (issue #8), so this run builds "
    "the tiny model and does one Megatron forward pass"
)


def prepare_model_dir(cfg: Config) -> Path:
    """Return the checkpoint directory, building the offline tiny model if it is missing."""
    model_dir = resolve_model_dir(cfg.model)
    if cfg.model.tiny and not cfg.model.path and not (model_dir / "config.json").is_file():
        from mcore_r1.models.tiny import ensure_tiny_model

        print(f"[smoke] building tiny model {cfg.model.tiny!r} at {model_dir}", flush=True)
        ensure_tiny_model(cfg.model.tiny, model_dir.parent)
    return model_dir


def _megatron_config(text: dict, shape: ModelShape):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=text.get("head_dim") or shape.hidden_size // shape.num_attention_heads,
        ffn_hidden_size=text["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=text.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def run_smoke_job(cfg: Config, shape: ModelShape) -> dict:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from transformers import AutoTokenizer

    from mcore_r1.parallel.dims import ParallelDims
    from mcore_r1.parallel.runtime import destroy_parallel, initialize_parallel

    print(BANNER, flush=True)
    model_dir = prepare_model_dir(cfg)
    hf = read_hf_config(model_dir)
    text = hf.get("text_config") or hf
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "How many red circles are in the image?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([ids if isinstance(ids, list) else ids["input_ids"]], dtype=torch.long)

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    initialize_parallel(ParallelDims(1), seed=cfg.trainer.seed)
    try:
        model = GPTModel(
            _megatron_config(text, shape),
            get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=shape.family == "qwen3"),
            vocab_size=shape.vocab_size,
            max_sequence_length=text.get("max_position_embeddings", 4096),
            position_embedding_type="rope",
            rotary_base=int(text.get("rope_theta", 10000)),
            share_embeddings_and_output_weights=hf.get("tie_word_embeddings", False),
        )
        seq = ids.shape[1]
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(
                ids,
                torch.arange(seq).unsqueeze(0),
                torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1),
            )
        seconds = time.perf_counter() - start
    finally:
        destroy_parallel()
    params = sum(p.numel() for p in model.parameters())
    result = {
        "model_dir": str(model_dir),
        "architecture": shape.architecture,
        "megatron_params": params,
        "prompt_tokens": seq,
        "logits_shape": tuple(logits.shape),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "forward_seconds": round(seconds, 4),
    }
    for key, value in result.items():
        print(f"[smoke] {key}: {value}", flush=True)
    if not result["logits_finite"]:
        raise RuntimeError("smoke job: Megatron forward produced non-finite logits")
    print("[smoke] ok", flush=True)
    return result
