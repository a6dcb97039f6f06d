"""Which Hugging Face architectures mcore_r1 supports, and the shape facts read from them.

The registry is keyed by the HF `architectures[0]` string. Reading a shape needs only
config.json (no weights, no torch), so the config validator can reject an impossible layout
before anything heavy starts. Vision-language configs keep the language model's numbers under
`text_config` (transformers 5) or at the top level (older files); both are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# architecture -> model family (one module per family in mcore_r1/models/)
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}


class UnknownArchitectureError(ValueError):
    """An HF architecture mcore_r1 has no builder for."""


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    vision_num_heads: Optional[int] = None
    vision_ffn: Optional[int] = None  # the vision MLP's width: split over TP like the heads

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def is_vision_language(self) -> bool:
        return self.vision_num_heads is not None


def check_architecture(architecture: str, source: str = "model") -> str:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnknownArchitectureError(
            f"{source}: unknown model architecture {architecture!r}; supported: "
            + ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        )
    return architecture


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of an HF config (nested under `text_config` in VL configs)."""
    return hf.get("text_config") or hf


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {model_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def shape_from_hf_config(
    hf: dict[str, Any], architecture: Optional[str] = None, source: str = "config.json"
) -> ModelShape:
    """Extract the numbers the parallel layout depends on from an HF config dict."""
    arch = architecture or (hf.get("architectures") or [None])[0]
    if arch is None:
        raise UnknownArchitectureError(f"{source}: no `architectures` entry and no override given")
    check_architecture(arch, source)
    text = text_config(hf)
    vision = hf.get("vision_config")

    def need(d: dict, key: str, where: str):
        if key not in d:
            raise KeyError(f"{source}: missing `{where}{key}`")
        return d[key]

    where = "text_config." if "text_config" in hf else ""
    heads = need(text, "num_attention_heads", where)
    return ModelShape(
        architecture=arch,
        num_layers=need(text, "num_hidden_layers", where),
        hidden_size=need(text, "hidden_size", where),
        num_attention_heads=heads,
        num_query_groups=text.get("num_key_value_heads") or heads,
        vocab_size=text.get("vocab_size") or need(hf, "vocab_size", ""),
        vision_num_heads=vision.get("num_heads") if vision else None,
        vision_ffn=_vision_ffn(vision) if vision else None,
    )


def _vision_ffn(vision: dict[str, Any]) -> Optional[int]:
    """Qwen2.5-VL names it `intermediate_size`; Qwen2-VL gives `embed_dim x mlp_ratio`."""
    if "intermediate_size" in vision:
        return vision["intermediate_size"]
    if "embed_dim" in vision and "mlp_ratio" in vision:
        return int(vision["embed_dim"] * vision["mlp_ratio"])
    return None
