"""Cross-field validation of a composed config, run before anything heavy starts.

Every rule reports the numbers that broke it (users meet these messages first, and the
arithmetic is the fix). All problems are collected and raised together as one `ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mcore_r1.config.schema import Config, ModelConfig
from mcore_r1.models.registry import ModelShape, UnknownArchitectureError, shape_from_hf_config
from mcore_r1.parallel.device import cuda_available
from mcore_r1.parallel.dims import LayoutError, ParallelDims


class ConfigError(ValueError):
    """One or more impossible settings; the message lists each with its arithmetic."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def resolve_model_dir(model: ModelConfig, data: Optional[Any] = None) -> Path:
    """The checkpoint directory: `model.path`, or the tiny model's cache directory (a warm-started
    tiny model's name depends on the data settings it was taught on)."""
    if model.path:
        return Path(model.path).expanduser()
    if model.tiny:
        from mcore_r1.models.tiny import default_tiny_root

        if model.warm_start:
            from mcore_r1.models.warmstart import warm_model_name

            return default_tiny_root() / warm_model_name(model.tiny, model.warm_start, data)
        return default_tiny_root() / model.tiny
    raise ConfigError(["model.path is empty and model.tiny is not set: name a checkpoint directory"])


def ensure_model_dir(model: ModelConfig, data: Optional[Any] = None) -> Path:
    """`resolve_model_dir`, building the offline tiny model there first when it is missing;
    `data` (the run's DataConfig) is what a warm-started tiny model is taught on."""
    model_dir = resolve_model_dir(model, data)
    if model.tiny and not model.path and not (model_dir / "config.json").is_file():
        if model.warm_start:
            from mcore_r1.models.warmstart import ensure_warm_model

            return ensure_warm_model(model.tiny, model.warm_start, model_dir.parent, data_cfg=data)
        from mcore_r1.models.tiny import ensure_tiny_model

        ensure_tiny_model(model.tiny, model_dir.parent)
    return model_dir


def resolve_model_hf_config(model: ModelConfig, data: Optional[Any] = None) -> tuple[dict, str]:
    """(HF config dict, its source): the checkpoint's config.json, else `model.config`'s shipped
    config (see `model_source`), else the tiny model's spec before it is built."""
    from mcore_r1.config.model_source import ModelSourceError, model_hf_config

    model_dir = resolve_model_dir(model, data)
    try:
        hf, source = model_hf_config(model, model_dir)
    except ModelSourceError as err:
        raise ConfigError([f"model: {err}"]) from err
    if hf is not None:
        return hf, source
    if model.tiny and not model.path:
        from mcore_r1.models.tiny import TINY_ARCHITECTURES, tiny_hf_config

        if model.tiny not in TINY_ARCHITECTURES:
            raise ConfigError(
                [f"model.tiny={model.tiny!r} is not a tiny model; known: {', '.join(TINY_ARCHITECTURES)}"]
            )
        hf = tiny_hf_config(model.tiny).to_dict()
        if not hf.get("architectures"):
            hf["architectures"] = [TINY_ARCHITECTURES[model.tiny]]
        return hf, f"tiny model {model.tiny!r}"
    raise ConfigError([source])


def resolve_model_shape(model: ModelConfig, data: Optional[Any] = None) -> ModelShape:
    """The shape the layout is checked against (see `resolve_model_hf_config`)."""
    hf, source = resolve_model_hf_config(model, data)
    return shape_from_hf_config(hf, model.architecture, source=source)


def _checkpoint_problems(cfg: Config) -> list[str]:
    """What a run on this machine needs beyond a plannable config: the weights themselves."""
    model = cfg.model
    if model.tiny and not model.path:
        return []  # built on first use
    model_dir = resolve_model_dir(model, cfg.data)
    if (model_dir / "config.json").is_file():
        return []
    hint = (f" (model.config={model.config!r} describes the model for planning only)"
            if model.config else "")
    return [f"model.path={str(model_dir)!r} holds no checkpoint (no config.json){hint}; download it, "
            f"e.g. `huggingface-cli download <hub name> --local-dir DIR`, and set model.path=DIR"]


def _layout_problems(cfg: Config, shape: Optional[ModelShape], local_run: bool) -> list[str]:
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
        if shape.vision_ffn is not None and shape.vision_ffn % p.tp:
            problems.append(
                f"parallel: the vision tower's MLP width {shape.vision_ffn} is not divisible by "
                f"TP={p.tp} ({shape.vision_ffn} % {p.tp} = {shape.vision_ffn % p.tp})"
            )
    if p.sequence_parallel and p.tp == 1:
        problems.append("parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.sequence_parallel and local_run and not cuda_available():
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
    elif shape is not None and shape.vision_ffn is not None and shape.vision_ffn % r.tp:
        problems.append(
            f"rollout.tp={r.tp} does not divide the vision tower's MLP width {shape.vision_ffn} "
            f"({shape.vision_ffn} % {r.tp} = {shape.vision_ffn % r.tp}; vLLM shards it too)"
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
    from mcore_r1.workers.batching import PACKING_SETTINGS
    from mcore_r1.workers.prompt_sharing import SHARING_SETTINGS

    if t.packing not in PACKING_SETTINGS:
        problems.append(f"trainer.packing={t.packing!r} is not one of {', '.join(PACKING_SETTINGS)}")
    if t.share_prompts not in SHARING_SETTINGS:
        problems.append(f"trainer.share_prompts={t.share_prompts!r} is not one of "
                        f"{', '.join(SHARING_SETTINGS)}")
    if t.old_logprobs not in ("auto", "recompute"):
        problems.append(f"trainer.old_logprobs={t.old_logprobs!r} is not one of auto, recompute")
    return problems


def _value_problems(cfg: Config) -> list[str]:
    r, a, d, t = cfg.rollout, cfg.algorithm, cfg.data, cfg.trainer
    checks = [
        (t.nonfinite in ("skip", "stop"), f"trainer.nonfinite={t.nonfinite!r} must be skip or stop"),
        (t.keep_last >= 1, f"trainer.keep_last={t.keep_last} must be >= 1"),
        (t.save_every >= 0 and t.exit_after_steps >= 0,
         f"trainer.save_every={t.save_every} and trainer.exit_after_steps={t.exit_after_steps} must be >= 0"),
        (t.worker_timeout_s > 0, f"trainer.worker_timeout_s={t.worker_timeout_s} must be > 0"),
        (bool(t.resume), "trainer.resume must be auto, off or a checkpoint path"),
        (r.n >= 1, f"rollout.n={r.n} must be >= 1"),
        (r.temperature >= 0, f"rollout.temperature={r.temperature} must be >= 0"),
        (0 < r.top_p <= 1, f"rollout.top_p={r.top_p} must be in (0, 1]"),
        (r.top_k == -1 or r.top_k >= 1, f"rollout.top_k={r.top_k} must be -1 (off) or >= 1"),
        (r.max_new_tokens >= 1, f"rollout.max_new_tokens={r.max_new_tokens} must be >= 1"),
        (a.clip_ratio_low >= 0 and a.clip_ratio_high >= 0,
         f"algorithm clip ratios must be >= 0 (low={a.clip_ratio_low}, high={a.clip_ratio_high})"),
        (a.clip_ratio_c > 1 or a.clip_ratio_c == 0,
         f"algorithm.clip_ratio_c={a.clip_ratio_c} must be > 1 (or 0 = dual clip off)"),
        (a.ppo_epochs >= 1, f"algorithm.ppo_epochs={a.ppo_epochs} must be >= 1"),
        (0 < d.min_pixels <= d.max_pixels,
         f"data.min_pixels={d.min_pixels} must be positive and <= data.max_pixels={d.max_pixels}"),
        (d.prompts_per_step >= 1, f"data.prompts_per_step={d.prompts_per_step} must be >= 1"),
        (cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"model.dtype={cfg.model.dtype!r} must be auto, float32, bfloat16 or float16"),
        (cfg.rollout.engine == "vllm", f"rollout.engine={cfg.rollout.engine!r}: only vllm exists"),
        (0.0 <= t.optimizer_offload_fraction <= 1.0,
         f"trainer.optimizer_offload_fraction={t.optimizer_offload_fraction} must be in [0, 1]"),
        (t.gpu_memory_gib > 0, f"trainer.gpu_memory_gib={t.gpu_memory_gib} must be > 0"),
        (0 < r.gpu_memory_utilization <= 1,
         f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} must be in (0, 1]"),
    ]
    from mcore_r1.rollout.colocated import CPU_WEIGHT_LAYOUTS

    checks.append((r.cpu_weights in CPU_WEIGHT_LAYOUTS,
                   f"rollout.cpu_weights={r.cpu_weights!r} is not one of {', '.join(CPU_WEIGHT_LAYOUTS)}"))
    unknown_backends = set(cfg.logger.backends) - {"console", "jsonl", "tensorboard"}
    checks.append((not unknown_backends,
                   f"logger.backends has unknown entries {sorted(unknown_backends)}; "
                   "known: console, jsonl, tensorboard"))
    return [msg for ok, msg in checks if not ok]


def _data_reward_problems(cfg: Config) -> list[str]:
    """Data formats, synthetic task and reward plumbing (the function itself is probed later)."""
    from mcore_r1.data.formats import FORMATS
    from mcore_r1.data.synthetic import TASKS

    d, w = cfg.data, cfg.reward
    try:
        from mcore_r1.data.synthetic import Difficulty

        Difficulty(d.synthetic_max_count, d.synthetic_max_distractors, d.synthetic_max_operand,
                   d.synthetic_grid)
        level_problem = None
    except ValueError as err:
        level_problem = f"data.synthetic_max_*: {err}"
    checks = [
        (level_problem is None, str(level_problem)),
        (d.format in FORMATS, f"data.format={d.format!r} is unknown; known: {', '.join(FORMATS)}"),
        (bool(d.train_files) or d.synthetic in TASKS,
         f"data.synthetic={d.synthetic!r} is unknown (data.train_files is empty); known: {', '.join(TASKS)}"),
        (d.synthetic_train_size >= 1 and d.synthetic_test_size >= 1,
         f"data.synthetic_train_size={d.synthetic_train_size} and data.synthetic_test_size="
         f"{d.synthetic_test_size} must be >= 1"),
        (d.max_prompt_length >= 1, f"data.max_prompt_length={d.max_prompt_length} must be >= 1"),
        (w.num_workers >= 0, f"reward.num_workers={w.num_workers} must be >= 0 (0 = in-process)"),
        (w.timeout_s > 0, f"reward.timeout_s={w.timeout_s} must be > 0"),
        (w.overlong_buffer >= 0, f"reward.overlong_buffer={w.overlong_buffer} must be >= 0 (0 = off)"),
        (not w.overlong_buffer or w.overlong_buffer < (w.max_response_length or cfg.rollout.max_new_tokens),
         f"reward.overlong_buffer={w.overlong_buffer} must be smaller than the length limit "
         f"{w.max_response_length or cfg.rollout.max_new_tokens} (reward.max_response_length, "
         "else rollout.max_new_tokens)"),
        (not w.remote_url or w.remote_url.startswith(("http://", "https://")),
         f"reward.remote_url={w.remote_url!r} must start with http:// or https://"),
        (not cfg.model.warm_start or (bool(cfg.model.tiny) and not cfg.model.path
                                      and cfg.model.warm_start in TASKS),
         f"model.warm_start={cfg.model.warm_start!r} needs a tiny model (model.tiny, no model.path) "
         f"and a synthetic task: {', '.join(TASKS)}"),
        (w.remote_retries >= 0 and w.remote_batch_size >= 1 and w.remote_timeout_s > 0,
         "reward.remote_retries must be >= 0, reward.remote_batch_size >= 1 and reward.remote_timeout_s > 0"),
    ]
    return [msg for ok, msg in checks if not ok]


def _algorithm_problems(cfg: Config) -> list[str]:
    """Names must exist in the `mcore_r1.algos` registries; estimators get the inputs they need."""
    from mcore_r1 import algos

    a, n = cfg.algorithm, cfg.rollout.n

    def known(value, names, what):
        return (value in names, f"algorithm.{what}={value!r} is unknown; known: {', '.join(names)}")

    kl_in_reward = not a.use_kl_loss and a.kl_coef > 0
    checks = [
        known(a.advantage_estimator, list(algos.ADVANTAGE_ESTIMATORS), "advantage_estimator"),
        known(a.policy_loss, list(algos.POLICY_LOSSES), "policy_loss"),
        known(a.loss_agg_mode, list(algos.AGG_MODES), "loss_agg_mode"),
        known(a.kl_estimator, list(algos.KL_ESTIMATOR_NAMES), "kl_estimator"),
        known(a.kl_ctrl, list(algos.KL_CONTROLLERS), "kl_ctrl"),
        known(a.singleton_groups, list(algos.SINGLETON_POLICIES), "singleton_groups"),
        known(a.rollout_is, list(algos.IS_LEVELS), "rollout_is"),
        (a.advantage_estimator not in algos.NEEDS_CRITIC or a.use_critic,
         f"algorithm.advantage_estimator={a.advantage_estimator} needs a critic: set algorithm.use_critic=true"),
        (not a.use_critic or a.advantage_estimator in algos.NEEDS_CRITIC,
         f"algorithm.use_critic=true but advantage_estimator={a.advantage_estimator} never reads "
         "values; use gae or drop the critic"),
        (a.advantage_estimator not in algos.NEEDS_GROUPS or n >= 2 or a.singleton_groups != "error",
         f"algorithm.advantage_estimator={a.advantage_estimator} compares responses within a group "
         f"but rollout.n={n}; raise rollout.n or set algorithm.singleton_groups"),
        (not a.dynamic_sampling or n >= 2,
         f"algorithm.dynamic_sampling needs rollout.n >= 2 (got {n}): a single response has no spread"),
        (not a.policy_loss.startswith("gspo") or (a.clip_ratio_low < 1 and a.clip_ratio_high < 1),
         f"algorithm.policy_loss={a.policy_loss} clips a sequence-level geometric-mean ratio; its "
         f"ranges are ~1e-4 (paper 3e-4 / 4e-4), got low={a.clip_ratio_low}, high={a.clip_ratio_high}"),
        (0 <= a.gamma <= 1 and 0 <= a.lam <= 1,
         f"algorithm.gamma={a.gamma} and algorithm.lam={a.lam} must be in [0, 1]"),
        (a.kl_coef >= 0, f"algorithm.kl_coef={a.kl_coef} must be >= 0"),
        (a.kl_ctrl != "adaptive" or (kl_in_reward and a.kl_target > 0 and a.kl_horizon > 0),
         "algorithm.kl_ctrl=adaptive steers KL in the reward: needs use_kl_loss=false, kl_coef > 0, "
         f"kl_target > 0, kl_horizon > 0 (got {a.use_kl_loss}, {a.kl_coef}, {a.kl_target}, {a.kl_horizon})"),
        (not (kl_in_reward and a.kl_estimator == "full"),
         "algorithm.kl_estimator=full needs full-vocabulary log-probs, which rollouts do not keep; "
         "use it only with use_kl_loss=true"),
        (0 <= a.overlong_buffer_len <= cfg.rollout.max_new_tokens,
         f"algorithm.overlong_buffer_len={a.overlong_buffer_len} must be in [0, rollout.max_new_tokens="
         f"{cfg.rollout.max_new_tokens}]"),
        (a.seq_norm_len >= 0, f"algorithm.seq_norm_len={a.seq_norm_len} must be >= 0"),
        (a.rollout_is_cap > 0, f"algorithm.rollout_is_cap={a.rollout_is_cap} must be > 0"),
        (a.value_clip >= 0 and a.critic_lr > 0,
         f"algorithm.value_clip={a.value_clip} must be >= 0 and critic_lr={a.critic_lr} > 0"),
    ]
    return [msg for ok, msg in checks if not ok]


def validate(cfg: Config, local_run: bool = False) -> ModelShape:
    """Check `cfg` and return the model shape it was checked against; raise `ConfigError`.

    `local_run=True` (the trainer's entry point) adds what running on *this* machine needs: the
    checkpoint on disk (not just `model.config`) and GPU-only features being available. Without
    it a config can be checked for a cluster from a laptop (`tools/plan.py`, the tests).
    """
    problems: list[str] = []
    shape: Optional[ModelShape] = None
    try:
        shape = resolve_model_shape(cfg.model, cfg.data)
    except ConfigError as err:
        problems.extend(err.problems)
    except (UnknownArchitectureError, FileNotFoundError, KeyError, ValueError) as err:
        problems.append(f"model: {err.args[0] if err.args else err}")
    if local_run and shape is not None:
        problems.extend(_checkpoint_problems(cfg))
    problems.extend(_layout_problems(cfg, shape, local_run))
    problems.extend(_value_problems(cfg))
    problems.extend(_data_reward_problems(cfg))
    problems.extend(_algorithm_problems(cfg))
    if problems:
        raise ConfigError(problems)
    return shape
