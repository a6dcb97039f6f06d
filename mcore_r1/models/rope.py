"""Rotary-embedding frequencies exactly as the HF configs specify them.

Megatron's `RotaryEmbedding` computes the default inverse frequencies itself but hard-codes
Llama 3.1's scaling constants (original context 8192, low/high frequency factors 1 and 4);
checkpoints may carry others. We compute the inverse frequencies from the config here and
install them on the model after it is built (`install_inv_freq`).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_parameters(hf_text: dict[str, Any]) -> dict[str, Any]:
    """Normalise transformers 5 `rope_parameters` and older `rope_theta`/`rope_scaling`."""
    params = dict(hf_text.get("rope_parameters") or {})
    legacy = hf_text.get("rope_scaling") or {}
    params.update({k: v for k, v in legacy.items() if k not in params})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf_text.get("rope_theta", 10000.0))
    return params


def inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies for `head_dim` (float32), default or llama3-scaled."""
    base = float(params["rope_theta"])
    # Computed on the CPU whatever the ambient default device (a meta-device build included:
    # `install_inv_freq` copies them into the model's own buffer).
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")
    freqs = 1.0 / (base ** (steps.float() / head_dim))
    kind = params["rope_type"]
    if kind in ("default", "mrope"):
        return freqs
    if kind == "llama3":
        return _llama3_scaled(freqs, params)
    raise NotImplementedError(f"rope type {kind!r} is not supported (supported: default, llama3)")


def _llama3_scaled(freqs: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated linearly in 1/wavelength.
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    context = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > context / low, freqs / factor, freqs)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, scaled)


def install_inv_freq(model: torch.nn.Module, freqs: torch.Tensor) -> None:
    """Replace the inverse frequencies of the model's rotary embedding (before any forward)."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return
    if rotary.inv_freq.shape != freqs.shape:
        raise ValueError(f"rotary inv_freq shape {tuple(rotary.inv_freq.shape)} != {tuple(freqs.shape)}")
    rotary.inv_freq = freqs.to(device=rotary.inv_freq.device, dtype=rotary.inv_freq.dtype)
