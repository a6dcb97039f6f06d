"""Cross-field validation of a composed config, run before anything heavy starts.

Every rule reports the numbers that broke it (users meet these messages first, and the
arithmetic is the fix). All problems are collected and raised together as one `ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mcore_r1.config.schema import Config, ModelConfig
from mcore_r1.models.registry import (
    ModelShape,
    UnknownArchitectureError,
    read_hf_config,
    shape_from_hf_config,
)
from mcore_r1.parallel.device import cuda_available
from mcore_r1.parallel.dims import LayoutError, ParallelDims


class ConfigError(ValueError):
    """One or more impossible settings; the message lists each with its arithmetic."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def resolve_model_dir(model: ModelConfig) -> Path:
    """The checkpoint directory: `model.path`, or the tiny model's cache directory."""
    if model.path:
        return Path(model.path).expanduser()
    if model.tiny:
        from mcore_r1.models.tiny import default_tiny_root

        return default_tiny_root() / model.tiny
    raise ConfigError(["model.path is empty and model.tiny is not set: name a checkpoint directory"])


def resolve_model_shape(model: ModelConfig) -> ModelShape:
    """Read the shape from config.json, or from the tiny model's spec before it is built."""
    model_dir = resolve_model_dir(model)
    if (model_dir / "config.json").is_file():
        return shape_from_hf_config(
            read_hf_config(model_dir), model.architecture, source=str(model_dir / "config.json")
        )
    if model.tiny and not model.path:
        from mcore_r1.models.tiny import TINY_ARCHITECTURES, tiny_hf_config

        if model.tiny not in TINY_ARCHITECTURES:
            raise ConfigError(
                [f"model.tiny={model.tiny!r} is not a tiny model; known: {', '.join(TINY_ARCHITECTURES)}"]
            )
        return shape_from_hf_config(
            tiny_hf_config(model.tiny).to_dict(),
            model.architecture or TINY_ARCHITECTURES[model.tiny],
            source=f"tiny model {model.tiny!r}",
        )
    raise ConfigError([f"model.path={str(model_dir)!r} has no config.json"])


def _layout_problems(cfg: Config, shape: Optional[ModelShape]) -> list[str]:
    problems: list[str] = []
    p, t = cfg.parallel, cfg.trainer
    world = t.nnodes * t.devices_per_node
    try:
        dims = ParallelDims(world, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep)
    except LayoutError as err:
        return [f"parallel: {err} (world = trainer.nnodes x trainer.devices_per_node = "
                f"{t.nnodes} x {t.devices_per_node})"]
    if shape is not None:
        problems += [f"parallel: {msg}" for msg in dims.model_problems(
            shape.num_layers, shape.num_attention_heads, shape.num_query_groups,
            what=f"model {shape.architecture}")]
        if shape.vision_num_heads is not None and shape.vision_num_heads % p.tp:
            problems.append(
                f"parallel: the vision tower's {shape.vision_num_heads} attention heads are not "
                f"divisible by TP={p.tp} ({shape.vision_num_heads} % {p.tp} = "
                f"{shape.vision_num_heads % p.tp})"
            )
    if p.sequence_parallel and p.tp == 1:
        problems.append("parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.sequence_parallel and not cuda_available():
        # Megatron's torch-native norms refuse sequence parallelism; TE/Apex norms need CUDA.
        problems.append("parallel.sequence_parallel=true needs TransformerEngine or Apex (GPU)")
    if p.vpp is not None and (p.pp == 1 or (shape and shape.num_layers % (p.pp * p.vpp))):
        layers = shape.num_layers if shape else "?"
        problems.append(
            f"parallel.vpp={p.vpp} needs pp > 1 and layers divisible by pp x vpp "
            f"({layers} layers, pp={p.pp})"
        )
    r = cfg.rollout
    if world % r.tp:
        problems.append(
            f"rollout.tp={r.tp} does not divide the training world of {world} processes "
            f"({world} % {r.tp} = {world % r.tp})"
        )
    elif shape is not None and shape.num_attention_heads % r.tp:
        problems.append(
            f"rollout.tp={r.tp} does not divide the model's {shape.num_attention_heads} "
            "attention heads (vLLM shards heads)"
        )
    responses = cfg.data.prompts_per_step * r.n
    mini = t.mini_batch_size
    if mini < 1 or responses % mini:
        problems.append(
            f"responses per step = data.prompts_per_step x rollout.n = {cfg.data.prompts_per_step} "
            f"x {r.n} = {responses} is not divisible into trainer.mini_batch_size={mini} "
            f"({responses} % {mini} = {responses % mini if mini else 'undefined'})"
        )
    elif mini % dims.dp:
        problems.append(
            f"trainer.mini_batch_size={mini} is not divisible by the data-parallel size "
            f"{dims.dp} ({dims.describe()})"
        )
    longest = cfg.data.max_prompt_length + r.max_new_tokens
    if t.micro_batch_tokens < longest:
        problems.append(
            f"trainer.micro_batch_tokens={t.micro_batch_tokens} cannot hold one sequence of "
            f"data.max_prompt_length + rollout.max_new_tokens = {cfg.data.max_prompt_length} + "
            f"{r.max_new_tokens} = {longest} tokens"
        )
    return problems


def _value_problems(cfg: Config) -> list[str]:
    r, a, d = cfg.rollout, cfg.algorithm, cfg.data
    checks = [
        (r.n >= 1, f"rollout.n={r.n} must be >= 1"),
        (r.temperature >= 0, f"rollout.temperature={r.temperature} must be >= 0"),
        (0 < r.top_p <= 1, f"rollout.top_p={r.top_p} must be in (0, 1]"),
        (r.top_k == -1 or r.top_k >= 1, f"rollout.top_k={r.top_k} must be -1 (off) or >= 1"),
        (r.max_new_tokens >= 1, f"rollout.max_new_tokens={r.max_new_tokens} must be >= 1"),
        (a.clip_ratio_low >= 0 and a.clip_ratio_high >= 0,
         f"algorithm clip ratios must be >= 0 (low={a.clip_ratio_low}, high={a.clip_ratio_high})"),
        (a.clip_ratio_c > 1, f"algorithm.clip_ratio_c={a.clip_ratio_c} must be > 1"),
        (a.ppo_epochs >= 1, f"algorithm.ppo_epochs={a.ppo_epochs} must be >= 1"),
        (0 < d.min_pixels <= d.max_pixels,
         f"data.min_pixels={d.min_pixels} must be positive and <= data.max_pixels={d.max_pixels}"),
        (d.prompts_per_step >= 1, f"data.prompts_per_step={d.prompts_per_step} must be >= 1"),
        (cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"model.dtype={cfg.model.dtype!r} must be auto, float32, bfloat16 or float16"),
        (cfg.rollout.engine == "vllm", f"rollout.engine={cfg.rollout.engine!r}: only vllm exists"),
    ]
    unknown_backends = set(cfg.logger.backends) - {"console", "jsonl", "tensorboard"}
    checks.append((not unknown_backends,
                   f"logger.backends has unknown entries {sorted(unknown_backends)}; "
                   "known: console, jsonl, tensorboard"))
    return [msg for ok, msg in checks if not ok]


def validate(cfg: Config) -> ModelShape:
    """Check `cfg` and return the model shape it was checked against; raise `ConfigError`."""
    problems: list[str] = []
    shape: Optional[ModelShape] = None
    try:
        shape = resolve_model_shape(cfg.model)
    except ConfigError as err:
        problems.extend(err.problems)
    except (UnknownArchitectureError, FileNotFoundError, KeyError, ValueError) as err:
        problems.append(f"model: {err.args[0] if err.args else err}")
    problems.extend(_layout_problems(cfg, shape))
    problems.extend(_value_problems(cfg))
    if problems:
        raise ConfigError(problems)
    return shape
