"""Typed configuration: dataclass schema (`schema`), Hydra registration and composition here,
cross-field checks in `validate`.

`conf/` holds the YAML groups (model, parallel, rollout, algorithm, data, reward, trainer, logger,
experiment); `conf/config.yaml` picks the defaults. The entry point composes them with Hydra;
tests and tools use `compose()` to get the same result without Hydra's job machinery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mcore_r1.config.schema import SCHEMAS, Config, EvalConfig, field_docs
from mcore_r1.config.validate import (
    ConfigError, resolve_model_dir, resolve_model_hf_config, resolve_model_shape, validate,
)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

__all__ = [
    "CONF_DIR", "Config", "ConfigError", "EvalConfig", "SCHEMAS", "compose", "experiment_names", "field_docs",
    "register_configs", "resolve_model_dir", "resolve_model_hf_config", "resolve_model_shape", "to_config",
    "validate",
]


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can use it as its base (`- base_config`)."""
    ConfigStore.instance().store(name="base_config", node=Config)
    ConfigStore.instance().store(name="eval_config", node=EvalConfig)  # conf/eval.yaml's base


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed DictConfig into the typed `Config` dataclass (resolving interpolations)."""
    node = OmegaConf.masked_copy(cfg, list(SCHEMAS)) if "hydra" in cfg else cfg
    return OmegaConf.to_object(node)


def compose(overrides: Optional[Sequence[str]] = None) -> DictConfig:
    """Compose `conf/config.yaml` plus overrides exactly as the command line would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides or []))
