"""Where a run's Hugging Face config comes from: the checkpoint, or a shipped config for planning.

One rule, used by the validator, the planner (`mcore_r1.plan`) and the shape simulation alike:

1. `model.path` has a config.json: that file. The checkpoint is the truth; when `model.config`
   is set as well, both must describe the same model (`shape_signature`), otherwise the plan
   that was checked is not the model that would run, and that is reported.
2. otherwise `model.config` is set: the shipped `conf/hf_configs/<name>/config.json` (or the
   config.json path it names). Enough to compose, validate and plan a large run on a laptop
   with no weights; the run itself still needs the checkpoint, which
   `validate(cfg, local_run=True)` (the trainer's entry point) insists on.
3. otherwise a tiny model's spec (`model.tiny`), or an error naming what is missing.

The shipped configs are exact copies of the public config.json files (sources in
`conf/hf_configs/README.md`); nothing here edits them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "hf_configs"


class ModelSourceError(ValueError):
    """No usable HF config for the model; the message says which setting to change."""


def shipped_config_names() -> list[str]:
    return sorted(p.parent.name for p in SHIPPED_CONFIGS.glob("*/config.json"))


def shipped_config_path(ref: str) -> Path:
    """`ref` as a shipped name (`Qwen2.5-VL-7B-Instruct`), a config.json, or its directory."""
    candidates = [SHIPPED_CONFIGS / ref / "config.json", Path(ref).expanduser(),
                  Path(ref).expanduser() / "config.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise ModelSourceError(
        f"model.config={ref!r} is neither a shipped config ({', '.join(shipped_config_names())}) "
        "nor a config.json path")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelSourceError(f"{path}: not valid JSON ({err})") from err


def shape_signature(hf: dict[str, Any]) -> dict[str, Any]:
    """The config entries that decide tensor shapes (and so the plan and the weight mapping)."""
    from mcore_r1.models.registry import text_config

    text, vision = text_config(hf), hf.get("vision_config") or {}
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "head_dim")
    sig = {k: text.get(k) for k in keys}
    sig["architecture"] = (hf.get("architectures") or [None])[0]
    sig["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    for k in ("depth", "hidden_size", "embed_dim", "num_heads", "intermediate_size", "out_hidden_size"):
        if k in vision:
            sig[f"vision_config.{k}"] = vision[k]
    return sig


def signature_mismatch(checkpoint: dict[str, Any], declared: dict[str, Any]) -> list[str]:
    a, b = shape_signature(checkpoint), shape_signature(declared)
    return [f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def model_hf_config(model: Any, model_dir: Path) -> tuple[Optional[dict[str, Any]], str]:
    """(HF config dict, where it came from) following the rule in the module docstring.

    Returns (None, reason) when neither the checkpoint nor `model.config` provides one, so the
    caller can fall back to a tiny model's spec or report `reason`.
    """
    own = model_dir / "config.json"
    if own.is_file():
        hf = read_json(own)
        if model.config:
            declared_path = shipped_config_path(model.config)
            diff = signature_mismatch(hf, read_json(declared_path))
            if diff:
                raise ModelSourceError(
                    f"model.path={str(model_dir)!r} does not match model.config={model.config!r} "
                    f"({declared_path}): " + "; ".join(diff)
                    + " (checkpoint vs declared); fix model.config or point model.path at that model")
        return hf, str(own)
    if model.config:
        path = shipped_config_path(model.config)
        return read_json(path), f"{path} (model.config; no checkpoint at model.path={str(model_dir)!r})"
    return None, f"model.path={str(model_dir)!r} has no config.json"


def has_checkpoint(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file()
