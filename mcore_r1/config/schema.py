"""The configuration schema: declared once, as dataclasses, with one line of doc per field.

Hydra composes YAML files from `conf/` on top of these dataclasses (registered in Hydra's
ConfigStore by `mcore_r1.config.register_configs`), so every override is type-checked and every
field has a documented default. Cross-field rules (layouts, batch arithmetic) live in
`mcore_r1.config.validate`, not here, so that all problems are reported together.

Batch sizes, stated once (all counts are global, summed over data-parallel ranks):
  data.prompts_per_step      prompts sampled per RL step
  rollout.n                  responses generated per prompt
  -> responses per step      = prompts_per_step * n
  trainer.mini_batch_size    responses per optimizer update; divides responses per step and is
                             split evenly over the DP ranks
  trainer.micro_batch_tokens token budget of one forward/backward micro-batch on one rank
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional


def knob(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached (read by `field_docs`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


@dataclass
class ModelConfig:
    path: str = knob("", "Hugging Face checkpoint directory (config.json, weights, tokenizer); empty = the tiny model's cache directory")
    tiny: Optional[str] = knob(None, "Offline tiny model built on first use when `path` is empty: qwen2, qwen3, llama3, qwen2_vl, qwen2_5_vl")
    architecture: Optional[str] = knob(None, "Override of the HF `architectures[0]`; normally read from config.json")
    dtype: str = knob("auto", "Training dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    freeze_vision_tower: bool = knob(False, "Keep the vision tower's weights fixed (VL models)")


@dataclass
class ParallelConfig:
    tp: int = knob(1, "Tensor-parallel size of the actor and reference models")
    pp: int = knob(1, "Pipeline-parallel size (layers split into this many stages)")
    cp: int = knob(1, "Context-parallel size (sequence split across ranks in attention)")
    ep: int = knob(1, "Expert-parallel size (MoE models only)")
    vpp: Optional[int] = knob(None, "Virtual pipeline stages per rank (interleaved 1F1B); None = off")
    sequence_parallel: bool = knob(False, "Shard activations outside attention/MLP over TP (needs tp > 1)")


@dataclass
class RolloutConfig:
    engine: str = knob("vllm", "Rollout engine; vLLM engines colocated with the training shards")
    tp: int = knob(1, "Tensor-parallel size of each vLLM engine; must divide the training world")
    n: int = knob(4, "Responses generated per prompt (the GRPO group size)")
    temperature: float = knob(1.0, "Sampling temperature for training rollouts")
    top_p: float = knob(1.0, "Nucleus sampling threshold in (0, 1]")
    top_k: int = knob(-1, "Top-k sampling; -1 disables it")
    max_new_tokens: int = knob(128, "Maximum response length in tokens")
    seed: int = knob(0, "Sampling seed of the rollout engines")
    gpu_memory_utilization: float = knob(0.6, "Fraction of GPU memory vLLM may take (GPU runs)")
    cpu_kv_cache_gib: float = knob(1.0, "KV-cache size in GiB for vLLM on CPU")
    enforce_eager: bool = knob(True, "Disable CUDA graphs / compilation in vLLM (faster start, slower decode)")
    val_n: int = knob(1, "Responses per prompt during validation")
    val_temperature: float = knob(0.0, "Sampling temperature during validation (0 = greedy)")


@dataclass
class AlgorithmConfig:
    name: str = knob("grpo", "Algorithm preset name, for logs: grpo, dapo, gspo, cispo, rloo, remax, reinforce_pp, ppo")
    advantage_estimator: str = knob("grpo", "Advantage estimator: gae, grpo, rloo, remax, reinforce_plus_plus, reinforce_plus_plus_baseline")
    norm_adv_by_std: bool = knob(True, "Divide group-centred rewards by the group std (off = Dr.GRPO)")
    policy_loss: str = knob("ppo_clip", "Policy loss: ppo_clip, gspo, gspo_token, cispo")
    clip_ratio_low: float = knob(0.2, "Lower PPO clip: ratio >= 1 - clip_ratio_low")
    clip_ratio_high: float = knob(0.2, "Upper PPO clip: ratio <= 1 + clip_ratio_high (DAPO clip-higher uses 0.28)")
    clip_ratio_c: float = knob(3.0, "Dual-clip bound c for negative advantages (> 1)")
    loss_agg_mode: str = knob("token-mean", "token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm")
    use_kl_loss: bool = knob(True, "Add KL(actor || reference) to the loss (GRPO) instead of the reward")
    kl_coef: float = knob(0.01, "Weight of the KL term")
    kl_estimator: str = knob("low_var_kl", "KL estimator: k1, abs, mse (k2), low_var_kl (k3), full")
    entropy_coeff: float = knob(0.0, "Entropy bonus weight")
    ppo_epochs: int = knob(1, "Passes over each rollout batch")
    dynamic_sampling: bool = knob(False, "DAPO: drop groups whose rewards are all equal and resample")


@dataclass
class DataConfig:
    train_files: str = knob("", "Training data: jsonl/json/parquet file or folder, or a datasets folder; empty = built-in synthetic task")
    val_files: str = knob("", "Validation data, same forms as train_files")
    format: str = knob("easyr1", "Record format: easyr1 (problem/answer/images) or lmm_r1 (OpenAI message list)")
    prompt_key: str = knob("problem", "Column holding the prompt text")
    answer_key: str = knob("answer", "Column holding the reference answer")
    image_key: str = knob("images", "Column holding the images (paths, bytes or PIL)")
    format_prompt: Optional[str] = knob(None, "Jinja file wrapping each prompt (e.g. math or r1v style)")
    system_prompt: Optional[str] = knob(None, "System message prepended to every conversation")
    max_prompt_length: int = knob(512, "Longest prompt in tokens; longer rows are dropped, never truncated")
    min_pixels: int = knob(3136, "Smallest image area in pixels after resizing (training and vLLM alike)")
    max_pixels: int = knob(50176, "Largest image area in pixels after resizing (training and vLLM alike)")
    prompts_per_step: int = knob(8, "Prompts sampled per RL step (global)")
    val_prompts: int = knob(32, "Prompts used per validation run; 0 = the whole validation split")
    shuffle: bool = knob(True, "Shuffle the training prompts each epoch (seeded)")
    seed: int = knob(1, "Seed of the data sampler")


@dataclass
class RewardConfig:
    function: str = knob("r1v", "Built-in reward name, or `path/to/file.py:fn`, or `pkg.module:fn`")
    kwargs: dict = knob({}, "Keyword arguments passed to the reward function")
    num_workers: int = knob(2, "Processes scoring rewards in parallel on the driver")
    timeout_s: float = knob(10.0, "Seconds one reward call may take before it scores 0 and is logged")


@dataclass
class TrainerConfig:
    nnodes: int = knob(1, "Number of nodes")
    devices_per_node: int = knob(1, "Training processes per node (GPUs, or CPU ranks)")
    total_steps: int = knob(20, "RL steps to run")
    lr: float = knob(1e-6, "Peak learning rate of the actor")
    min_lr: float = knob(0.0, "Learning rate at the end of the decay")
    lr_warmup_steps: int = knob(0, "Optimizer steps of linear warmup")
    lr_decay_style: str = knob("constant", "constant, linear or cosine decay after warmup")
    weight_decay: float = knob(0.01, "AdamW weight decay")
    clip_grad: float = knob(1.0, "Gradient-norm clipping threshold; 0 disables it")
    mini_batch_size: int = knob(16, "Responses per optimizer update (global); divides prompts_per_step * n")
    micro_batch_tokens: int = knob(4096, "Token budget of one packed micro-batch on one rank")
    val_every: int = knob(5, "Validate every N steps; 0 = never")
    save_every: int = knob(0, "Checkpoint every N steps; 0 = only at the end")
    output_dir: str = knob("outputs/${now:%Y-%m-%d_%H-%M-%S}", "Run directory: metrics, checkpoints, logs")
    seed: int = knob(1, "Global seed (model init, dropout, sampling order)")
    resume: str = knob("auto", "auto (latest complete checkpoint in output_dir), off, or a checkpoint path")


@dataclass
class LoggerConfig:
    backends: list = knob(["console", "jsonl", "tensorboard"], "Where metrics go: console, jsonl, tensorboard")
    run_name: str = knob("mcore_r1", "Run name shown in logs and trackers")
    log_every: int = knob(1, "Log metrics every N steps")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "rollout": RolloutConfig,
    "algorithm": AlgorithmConfig,
    "data": DataConfig,
    "reward": RewardConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
}


def field_docs(schema: type = Config, prefix: str = "") -> dict[str, str]:
    """Flattened `group.field -> doc` for every leaf field (used by docs and tests)."""
    docs: dict[str, str] = {}
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        sub = SCHEMAS.get(f.name) if schema is Config else None
        if sub is not None and is_dataclass(sub):
            docs.update(field_docs(sub, name + "."))
        else:
            docs[name] = f.metadata.get("doc", "")
    return docs
