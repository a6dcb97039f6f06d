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
    config: Optional[str] = knob(None, "The model's HF config for planning and validation before the checkpoint is on disk: a name under conf/hf_configs/ (e.g. Qwen2.5-VL-7B-Instruct) or a config.json path; used only when `path` has no config.json, and must agree with it when it has one")
    tiny: Optional[str] = knob(None, "Offline tiny model built on first use when `path` is empty: qwen2, qwen3, llama3, qwen2_vl, qwen2_5_vl")
    warm_start: Optional[str] = knob(None, "Tiny models only: first teach the answer format (not the answers) of this synthetic task, counting or arithmetic, by a short SFT with random answers")
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
    ignore_eos: bool = knob(False, "Training rollouts keep sampling past EOS and stop tokens until max_new_tokens (fixed-length responses, e.g. for benchmarks); validation still stops at EOS")
    seed: int = knob(0, "Sampling seed of the rollout engines")
    gpu_memory_utilization: float = knob(0.6, "Fraction of GPU memory vLLM may take (GPU runs)")
    cpu_kv_cache_gib: float = knob(1.0, "KV-cache size in GiB for vLLM on CPU")
    enforce_eager: bool = knob(True, "Disable CUDA graphs / compilation in vLLM (faster start, slower decode)")
    cpu_weights: str = knob("packed", "vLLM on CPU: packed (vLLM's oneDNN-packed weights: fastest decode, every refit re-packs all layers) or plain (weights kept as tensors under oneDNN's matmul: a refit is an in-place copy, decode ~20-30% slower)")
    val_n: int = knob(1, "Responses per prompt during validation")
    val_temperature: float = knob(0.0, "Sampling temperature during validation (0 = greedy)")


@dataclass
class AlgorithmConfig:
    name: str = knob("grpo", "Algorithm preset name, for logs: grpo, dapo, gspo, cispo, rloo, remax, reinforce_plus_plus, ppo, dr_grpo")
    advantage_estimator: str = knob("grpo", "Advantage estimator: gae, grpo, rloo, remax, reinforce_plus_plus, reinforce_plus_plus_baseline")
    norm_adv_by_std: bool = knob(True, "Divide group-centred rewards by the group std (off = Dr.GRPO)")
    policy_loss: str = knob("ppo_clip", "Policy loss: ppo_clip, gspo, gspo_token, cispo")
    clip_ratio_low: float = knob(0.2, "Lower PPO clip: ratio >= 1 - clip_ratio_low")
    clip_ratio_high: float = knob(0.2, "Upper PPO clip: ratio <= 1 + clip_ratio_high (DAPO clip-higher uses 0.28)")
    clip_ratio_c: float = knob(3.0, "Dual-clip bound c for negative advantages (> 1; 0 = off, as OpenRLHF)")
    loss_agg_mode: str = knob("token-mean", "token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm")
    use_kl_loss: bool = knob(True, "Add KL(actor || reference) to the loss (GRPO) instead of the reward (kl_coef 0 = no KL)")
    kl_coef: float = knob(0.01, "Weight of the KL term")
    kl_estimator: str = knob("low_var_kl", "KL estimator: k1, abs, mse (k2), low_var_kl (k3), full")
    entropy_coeff: float = knob(0.0, "Entropy bonus weight")
    ppo_epochs: int = knob(1, "Passes over each rollout batch")
    dynamic_sampling: bool = knob(False, "DAPO: drop groups whose rewards are all equal and resample")
    dynamic_sampling_max_tries: int = knob(10, "DAPO: generation rounds allowed to fill a batch with informative groups; <= 0 = unlimited")
    overlong_buffer_len: int = knob(0, "DAPO overlong shaping: penalty ramps over the last N tokens before rollout.max_new_tokens; 0 = off")
    overlong_penalty_factor: float = knob(1.0, "DAPO overlong shaping: reward penalty at the length limit (-factor)")
    gamma: float = knob(1.0, "Discount factor for gae and reinforce_plus_plus returns")
    lam: float = knob(1.0, "GAE lambda (bias/variance trade-off of the critic's advantage)")
    adv_std_eps: float = knob(1e-6, "GRPO: A = (s - mean) / (std + eps), unbiased group std (verl/EasyR1)")
    singleton_groups: str = knob("error", "Groups of one response for grpo/rloo/rf++-baseline: error, zero (advantage 0), no_baseline (raw score)")
    seq_norm_len: int = knob(0, "Constant length of seq-mean-token-sum-norm (Dr.GRPO); 0 = rollout.max_new_tokens")
    kl_ctrl: str = knob("fixed", "KL-in-reward coefficient controller: fixed or adaptive (Ziegler et al.)")
    kl_target: float = knob(0.1, "Adaptive KL controller: target KL per token")
    kl_horizon: int = knob(10000, "Adaptive KL controller: horizon in responses")
    rollout_is: str = knob("off", "Truncated importance sampling on train/rollout log-prob mismatch: off, token, sequence")
    rollout_is_cap: float = knob(2.0, "Truncation cap of the rollout importance weights")
    use_critic: bool = knob(False, "Train a value model (needed by the gae estimator, i.e. PPO)")
    critic_lr: float = knob(1e-5, "Learning rate of the critic")
    value_clip: float = knob(0.5, "Critic loss clip range around the old values; 0 = unclipped")


@dataclass
class DataConfig:
    train_files: str = knob("", "Training data: jsonl/json/parquet file or folder, a save_to_disk folder, or name@split; comma-separated for several; empty = built-in synthetic task")
    val_files: str = knob("", "Validation data, same forms as train_files; empty with a synthetic task = its test split")
    synthetic: str = knob("counting", "Built-in synthetic task used when train_files is empty: counting (vision) or arithmetic (text)")
    synthetic_train_size: int = knob(512, "Rows in the synthetic train split")
    synthetic_test_size: int = knob(64, "Rows in the synthetic test split")
    synthetic_seed: int = knob(0, "Seed the synthetic task is generated from (same seed, same files)")
    synthetic_max_count: int = knob(6, "counting: 1..N target shapes per picture")
    synthetic_max_distractors: int = knob(3, "counting: 0..N extra shapes of other colours per picture")
    synthetic_grid: int = knob(4, "counting: the picture is grid x grid cells of 28 px (one vision token each)")
    synthetic_max_operand: int = knob(99, "arithmetic: largest operand of + and - (* and / stay within 12 x 12)")
    format: str = knob("easyr1", "Record format: easyr1 (problem/answer/images) or lmm_r1 (OpenAI message list)")
    prompt_key: str = knob("problem", "Column holding the prompt text (easyr1), with one <image> tag per image")
    answer_key: str = knob("answer", "Column holding the reference answer")
    image_key: str = knob("images", "Column holding the images (paths, bytes or PIL) (easyr1)")
    message_key: str = knob("message", "Column holding the OpenAI message list, a JSON string or a list (lmm_r1)")
    image_dir: Optional[str] = knob(None, "Directory relative image paths are resolved against before the dataset file's own directory")
    format_prompt: Optional[str] = knob(None, "Jinja format prompt wrapping the user text: shipped math, r1v, confidence, or a file path")
    system_prompt: Optional[str] = knob(None, "System message prepended to every conversation")
    max_prompt_length: int = knob(512, "Longest prompt in tokens (image tokens included); prompts are never truncated")
    filter_overlong_prompts: bool = knob(True, "Drop (and count) prompts longer than max_prompt_length; false = such a prompt is an error")
    skip_bad_rows: bool = knob(False, "Skip rows that cannot be used (bad JSON, missing image or answer), counting and logging them; false = error")
    min_pixels: int = knob(3136, "Smallest image area in pixels after resizing (training and vLLM alike)")
    max_pixels: int = knob(50176, "Largest image area in pixels after resizing (training and vLLM alike)")
    prompts_per_step: int = knob(8, "Prompts sampled per RL step (global)")
    val_prompts: int = knob(32, "Prompts used per validation run; 0 = the whole validation split")
    shuffle: bool = knob(True, "Shuffle the training prompts each epoch (seeded)")
    seed: int = knob(1, "Seed of the data sampler")


@dataclass
class RewardConfig:
    function: str = knob("r1v", "Built-in reward (math, r1v, confidence), or `path/to/file.py[:fn]`, or `pkg.module:fn`")
    kwargs: dict = knob({}, "Keyword arguments passed to the reward function (e.g. format_weight)")
    num_workers: int = knob(2, "Processes scoring rewards in parallel on the driver; 0 = in-process without timeouts (debugging)")
    timeout_s: float = knob(10.0, "Seconds one sample's reward may take; then the worker is killed and the sample gets fallback_score")
    fallback_score: float = knob(0.0, "Reward given to a sample whose scoring timed out, raised, crashed or failed remotely (counted and logged)")
    overlong_buffer: int = knob(0, "DAPO soft overlong penalty: tokens before the length limit where the penalty ramps to -1; 0 = off")
    overlong_penalty_factor: float = knob(1.0, "Weight of the overlong penalty added to `overall`")
    max_response_length: int = knob(0, "Length limit of the overlong penalty in tokens; 0 = rollout.max_new_tokens")
    remote_url: Optional[str] = knob(None, "HTTP endpoint scoring batches instead of `function` (like OpenRLHF --remote_rm_url)")
    remote_timeout_s: float = knob(30.0, "Seconds one remote request may take")
    remote_retries: int = knob(3, "Extra attempts after a failed remote request (exponential backoff); then fallback_score")
    remote_batch_size: int = knob(64, "Samples per remote request")


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
    packing: str = knob("auto", "Attention over packed micro-batches on Megatron's local layers (CPU): auto/segments = per sequence; mask = one block-diagonal [T, T] mask (O(T^2) memory; the default job's recorded recipe). GPU with TransformerEngine: auto only")
    share_prompts: str = knob("auto", "Pack the responses of one prompt around a single copy of the prompt (same results, a prompt's tokens computed once): auto = where it applies (local layers with 'segments' attention, text-only batches); off = every response with its own prompt")
    old_logprobs: str = knob("auto", "Old-policy log-probs: auto (on-policy steps, i.e. one epoch and one mini-batch per rollout batch with no KL in the reward and no rollout_is, take them from the update's own forward instead of a separate pass) or recompute (always a separate pass)")
    val_every: int = knob(5, "Validate every N steps; 0 = never")
    save_every: int = knob(0, "Checkpoint every N steps (and always at the end and on SIGTERM/SIGINT); 0 = only then")
    keep_last: int = knob(2, "Checkpoints kept besides the best one; older ones are deleted after a newer one is complete")
    best_metric: str = knob("", "Validation metric whose best checkpoint is always kept (higher is better), e.g. val/accuracy; empty = none")
    save_checkpoints: bool = knob(True, "Write checkpoints at all (false: nothing is saved, not even at the end)")
    exit_after_steps: int = knob(0, "Stop this invocation after N steps, saving a checkpoint to resume from (time-sliced jobs); 0 = run to total_steps")
    output_dir: str = knob("outputs/${now:%Y-%m-%d_%H-%M-%S}", "Run directory: metrics, checkpoints (checkpoints/step_N), logs")
    seed: int = knob(1, "Global seed (model init, dropout, sampling order)")
    resume: str = knob("auto", "auto (the newest complete checkpoint in output_dir, if any), off, or a checkpoint path")
    nonfinite: str = knob("skip", "NaN/Inf in the loss or gradient norm: skip (drop that update, count it) or stop (fail naming the metric)")
    worker_timeout_s: float = knob(1800.0, "Seconds any single call to the workers may take before the run stops with the worker and phase named")
    optimizer_offload_fraction: float = knob(0.0, "GPU runs: share of the distributed optimizer's fp32 state (master weights, Adam moments) kept and stepped in host memory by Megatron's HybridDeviceOptimizer, 0..1; ignored on CPU")
    gpu_memory_gib: float = knob(80.0, "Memory of one accelerator in GiB, the budget tools/plan.py checks a layout against (not read at run time)")


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


@dataclass
class EvalConfig:
    """`python -m mcore_r1.eval`: generate with vLLM on a dataset split, score, write metrics.

    Sampling uses rollout.val_n responses per prompt at rollout.val_temperature (plus top_p,
    top_k, max_new_tokens, seed from `rollout`).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    split: str = knob("test", "Which data to evaluate: test (data.val_files or the synthetic test split) or train")
    max_prompts: int = knob(0, "Evaluate only the first N prompts; 0 = all")
    k: list = knob([1], "pass@k values to report (unbiased estimator); each must be <= rollout.val_n")
    correct_threshold: float = knob(1.0, "Without an `accuracy` reward component, a sample is correct when overall >= this")
    output_dir: str = knob("outputs/eval/${now:%Y-%m-%d_%H-%M-%S}", "Where metrics.json and samples.jsonl are written")
    cache_dir: str = knob("", "Result cache keyed by a hash of model, dataset and settings; empty = $MCORE_R1_CACHE/eval or ~/.cache/mcore_r1/eval")
    use_cache: bool = knob(True, "Reuse cached results for the same model, dataset and settings")


EVAL_SCHEMAS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "rollout": RolloutConfig,
                                 "reward": RewardConfig}


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
