"""The hybrid worker: one training process holding its actor shard, reference and vLLM shard.

One `HybridWorker` runs per device (a GPU, or a CPU rank), as a Ray actor placed by
`mcore_r1.trainer.placement`. All workers together form one torch.distributed world with
Megatron's TP/PP/CP/DP groups; inside each process live

* the actor: this rank's Megatron-Core stage, wrapped in Megatron's DDP, with Megatron's
  optimizer (distributed optimizer on GPU, the plain one on CPU) and its LR scheduler;
* the reference: the same layout, frozen, for the KL term (only when `kl_coef > 0`);
* the critic (PPO/GAE only): the actor's checkpoint with a value head (`workers.critic`);
* the rollout engine: a colocated vLLM shard (`ColocatedEngine`), refitted in place from the
  actor after every update.

The driver owns the loop and the data; every method here is a collective step that all workers
run together (the driver calls them in parallel and waits). Methods return results only from
the ranks that hold them (the last pipeline stage, TP rank 0), `None` elsewhere, and say which
data-parallel rank they speak for.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence as Seq

import torch

from mcore_r1.config.schema import Config
from mcore_r1.workers.sequences import Sequence


@dataclass
class RankInfo:
    rank: int
    dp_rank: int
    dp_size: int
    replica: int       # rollout replica this rank belongs to
    num_replicas: int
    reports: bool      # last PP stage, TP rank 0, CP rank 0: returns per-sample results
    rollout_leader: bool  # first rank of its rollout replica: returns generations


def training_dtype(name: str) -> torch.dtype:
    from mcore_r1.parallel.device import default_dtype_name

    name = default_dtype_name() if name == "auto" else name
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class HybridWorker:
    def __init__(self, cfg: Config, model_dir: str, env: dict[str, str], threads: int = 1):
        os.environ.update(env)
        torch.set_num_threads(max(1, threads))
        self.cfg, self.model_dir = cfg, model_dir
        self.samples: list = []

    # -- bring-up ---------------------------------------------------------------------------

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port (asked of rank 0 for torch.distributed)."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def set_rendezvous(self, addr: str, port: int) -> None:
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))

    def setup(self, total_updates: int, max_images_per_prompt: int) -> RankInfo:
        from megatron.core import parallel_state as mpu

        from mcore_r1.data.dataset import load_processor
        from mcore_r1.models.builder import load_hf_model
        from mcore_r1.models.dense import ModelLayout
        from mcore_r1.models.registry import text_config
        from mcore_r1.parallel import ParallelDims
        from mcore_r1.parallel.runtime import initialize_parallel
        from mcore_r1.workers.sequences import SampleBuilder

        from mcore_r1.workers.batching import set_packing_format
        from mcore_r1.workers.prompt_sharing import set_prompt_sharing

        cfg = self.cfg
        p, t = cfg.parallel, cfg.trainer
        set_packing_format(t.packing)
        set_prompt_sharing(t.share_prompts)
        world = int(os.environ["WORLD_SIZE"])
        initialize_parallel(ParallelDims(world, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep), seed=t.seed)
        layout = ModelLayout(tp=p.tp, pp=p.pp)
        dtype = training_dtype(cfg.model.dtype)
        model, self.hf = load_hf_model(self.model_dir, layout, dtype)
        self.vocab = text_config(self.hf)["vocab_size"]
        frozen = self._freeze_vision(model)
        self.actor, self.optimizer, self.scheduler = build_optimizer(model, cfg, dtype, total_updates)
        self.critic = None
        if cfg.algorithm.use_critic:
            from mcore_r1.workers.critic import attach_value_head

            critic, _ = load_hf_model(self.model_dir, layout, dtype)
            self.critic, self.critic_optimizer, self.critic_scheduler = build_optimizer(
                attach_value_head(critic), cfg, dtype, total_updates, lr=cfg.algorithm.critic_lr)
        self.ref = None
        if cfg.algorithm.kl_coef > 0:
            self.ref, _ = load_hf_model(self.model_dir, layout, dtype)
            self.ref.eval().requires_grad_(False)
        processor = load_processor(self.model_dir, cfg.data)
        self.builder = SampleBuilder(self.hf, processor)
        self.engine = self._build_engine(max_images_per_prompt)
        from mcore_r1.rollout.refit import RefitSource

        self.refit_source = RefitSource.from_megatron(model, self.hf, tp=p.tp, frozen=frozen)
        self.info = RankInfo(
            rank=int(os.environ["RANK"]), dp_rank=mpu.get_data_parallel_rank(),
            dp_size=mpu.get_data_parallel_world_size(), replica=self.engine.replica,
            num_replicas=self.engine.num_replicas,
            reports=(mpu.is_pipeline_last_stage() and mpu.get_tensor_model_parallel_rank() == 0
                     and mpu.get_context_parallel_rank() == 0),
            rollout_leader=int(os.environ["RANK"]) % cfg.rollout.tp == 0)
        return self.info

    def _freeze_vision(self, model: torch.nn.Module) -> tuple[str, ...]:
        vision = getattr(model, "vision_model", None)
        if vision is None or not self.cfg.model.freeze_vision_tower:
            return ()
        vision.requires_grad_(False)
        return ("vision_model.",)  # never resent to vLLM: it cannot change

    def _build_engine(self, max_images_per_prompt: int):
        from mcore_r1.data.dataset import is_multimodal_dir
        from mcore_r1.data.images import pixel_limits
        from mcore_r1.rollout.colocated import ColocatedEngine

        r, d = self.cfg.rollout, self.cfg.data
        vl = is_multimodal_dir(self.model_dir)
        replica = int(os.environ["RANK"]) // r.tp
        return ColocatedEngine(
            self.model_dir, rollout_tp=r.tp, max_model_len=d.max_prompt_length + r.max_new_tokens,
            # replicas draw different random streams; ranks of one replica must agree
            seed=r.seed + replica, kv_cache_gib=r.cpu_kv_cache_gib, enforce_eager=r.enforce_eager,
            pixel_limits=pixel_limits(d.min_pixels, d.max_pixels) if vl else None,
            max_images_per_prompt=max_images_per_prompt if vl else 0,
            cpu_weights=r.cpu_weights, gpu_memory_utilization=r.gpu_memory_utilization,
            # vLLM holds the weights in the trainer's dtype: a refit is then a plain copy
            dtype=str(training_dtype(self.cfg.model.dtype)).removeprefix("torch."))

    # -- rollout ----------------------------------------------------------------------------

    def generate(self, prompts: list[dict], options, seeds: Optional[list[int]] = None) -> Optional[list]:
        """This replica's prompts (every rank of a replica gets the same list), one seed each."""
        self.engine.wake_up()
        try:
            results = self.engine.generate(prompts, options, seeds) if prompts else []
        finally:
            self.engine.sleep()
        return results if self.info.rollout_leader else None

    def refit(self) -> Optional[dict]:
        from mcore_r1.rollout.refit import refit

        self.engine.wake_up()
        try:
            metrics = refit(self.engine, self.refit_source)
        finally:
            self.engine.sleep()
        return metrics.as_dict() if self.info.rank == 0 else None

    # -- training ---------------------------------------------------------------------------

    def set_batch(self, sequences: Seq[Sequence]) -> int:
        """This DP rank's sequences of the step; later calls index into them."""
        self.samples = self.builder.build(sequences)
        return len(self.samples)

    def log_probs(self, which: str, with_entropy: bool = False) -> Optional[dict]:
        """Per-token log-probs of every sequence of `set_batch` under `actor` or `ref`."""
        from mcore_r1.workers.logprobs import compute_logprobs

        model = {"actor": self.actor, "ref": self.ref}[which]
        if model is None:
            raise RuntimeError(f"log_probs({which!r}): this run has no {which} model")
        # Same temperature as the loss: log-probs of the distribution the rollout sampled from.
        out = compute_logprobs(model, self.samples, self.vocab, self.cfg.trainer.micro_batch_tokens,
                               temperature=self.cfg.rollout.temperature or 1.0,
                               with_entropy=with_entropy)
        if not self.info.reports:
            return None
        logp, ent = out if with_entropy else (out, None)
        return {"dp_rank": self.info.dp_rank, "logp": logp, "entropy": ent}

    def values(self) -> Optional[dict]:
        """The critic's value of every response token of `set_batch`."""
        from mcore_r1.workers.critic import compute_values

        values = compute_values(self.critic, self.samples, self.cfg.trainer.micro_batch_tokens)
        return {"dp_rank": self.info.dp_rank, "values": values} if self.info.reports else None

    def train_mini_batch(self, rows: list[int], matrices: dict[str, torch.Tensor]) -> Optional[dict]:
        """One optimizer update on this DP rank's share `rows` of a mini-batch (and one of the
        critic when `matrices` carries returns)."""
        from mcore_r1.workers.policy_step import policy_loss_step

        metrics = self._train_critic(rows, matrices) if "returns" in matrices else {}
        start = time.perf_counter()
        self.actor.zero_grad_buffer()
        self.optimizer.zero_grad()
        result = policy_loss_step(
            self.actor, [self.samples[i] for i in rows], self.vocab,
            self.cfg.trainer.micro_batch_tokens, old_log_probs=matrices.get("old_log_probs"),
            advantages=matrices["advantages"], response_mask=matrices["response_mask"],
            ref_log_probs=matrices.get("ref_log_probs"), is_weights=matrices.get("is_weights"),
            cfg=loss_config(self.cfg), grad_scale=float(self.info.dp_size))
        ok, grad_norm = guarded_step(self.optimizer, "actor", result.loss, self.cfg.trainer.nonfinite)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(increment=1)
        if not self.info.reports:
            return None
        metrics.update({"actor/loss": result.loss, "actor/grad_norm": grad_norm,
                   "actor/lr": lr, "actor/update_skipped": float(not ok),
                   "actor/micro_batches": float(result.num_micro_batches),
                   "actor/update_seconds": time.perf_counter() - start})
        metrics.update({f"actor/{k}": v for k, v in result.metrics.items()})
        if result.log_probs is not None:  # on-policy: the update's log-probs, as `log_probs` gives
            metrics["on_policy"] = {"dp_rank": self.info.dp_rank,
                                    "logp": _in_sample_order(rows, result.log_probs, len(self.samples)),
                                    "entropy": _in_sample_order(rows, result.entropy, len(self.samples))}
        return metrics

    def _train_critic(self, rows: list[int], matrices: dict[str, torch.Tensor]) -> dict:
        from mcore_r1 import algos
        from mcore_r1.workers.critic import value_loss_step

        a = self.cfg.algorithm
        self.critic.zero_grad_buffer()
        self.critic_optimizer.zero_grad()
        result = value_loss_step(
            self.critic, [self.samples[i] for i in rows], self.cfg.trainer.micro_batch_tokens,
            returns=matrices["returns"], old_values=matrices["values"],
            response_mask=matrices["response_mask"], clip=algos.value_clip(a),
            agg_mode=a.loss_agg_mode, norm_len=algos.seq_norm_len(a, self.cfg.rollout.max_new_tokens),
            grad_scale=float(self.info.dp_size))
        loss = result.loss if result is not None else 0.0
        ok, grad_norm = guarded_step(self.critic_optimizer, "critic", loss, self.cfg.trainer.nonfinite)
        self.critic_scheduler.step(increment=1)
        if result is None:
            return {}
        return {"critic/loss": result.loss, "critic/grad_norm": grad_norm,
                "critic/update_skipped": float(not ok),
                **{f"critic/{k}": v for k, v in result.metrics.items()}}

    # -- checkpoints ------------------------------------------------------------------------

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"world": int(os.environ["WORLD_SIZE"]), "rank": self.info.rank, "tp": p.tp,
                "pp": p.pp, "cp": p.cp}

    def save_checkpoint(self, path: str) -> None:
        """Write this rank's share of the actor (and critic), optimizer, scheduler and RNG."""
        from mcore_r1.workers import checkpointing as ckpt

        path = Path(path)
        ckpt.save_model(self.actor.module, self.optimizer, self.scheduler, path, "model", "optimizer")
        if self.critic is not None:
            ckpt.save_model(self.critic.module, self.critic_optimizer, self.critic_scheduler, path,
                            "critic", "critic_optimizer")
        ckpt.save_rng(path, self._layout())

    def load_checkpoint(self, path: str) -> Optional[str]:
        """Load a checkpoint written at any layout, then refit vLLM from the loaded actor.
        Returns (from rank 0) a note when RNG streams could not be restored."""
        from mcore_r1.workers import checkpointing as ckpt

        path = Path(path)
        ckpt.load_model(self.actor.module, self.optimizer, self.scheduler, path, "model", "optimizer")
        if self.critic is not None:
            ckpt.load_model(self.critic.module, self.critic_optimizer, self.critic_scheduler, path,
                            "critic", "critic_optimizer")
        note = ckpt.load_rng(path, self._layout())
        self.refit()
        return note if self.info.rank == 0 else None

    def close(self) -> None:
        from mcore_r1.parallel.runtime import destroy_parallel

        # vLLM tears down its groups on shutdown: close it while torch.distributed is up.
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None
        destroy_parallel()


def loss_config(cfg: Config):
    from mcore_r1 import algos
    from mcore_r1.workers.policy_step import LossConfig

    a = cfg.algorithm
    return LossConfig(
        policy_loss=a.policy_loss, loss_kwargs=algos.policy_loss_kwargs(a), agg_mode=a.loss_agg_mode,
        norm_len=algos.seq_norm_len(a, cfg.rollout.max_new_tokens), entropy_coeff=a.entropy_coeff,
        kl_coef=a.kl_coef if a.use_kl_loss else 0.0, kl_estimator=a.kl_estimator,
        temperature=cfg.rollout.temperature or 1.0)


def build_optimizer(model: torch.nn.Module, cfg: Config, dtype: torch.dtype, total_updates: int,
                    lr: Optional[float] = None):
    """Megatron DDP + optimizer + LR scheduler for `model` (this rank's actor or critic stage);
    `lr` overrides trainer.lr (the critic's own rate); warmup and decay follow trainer.*."""
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from mcore_r1.parallel.device import cuda_available

    t = cfg.trainer
    lr = t.lr if lr is None else lr
    on_gpu = cuda_available()
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                    use_distributed_optimizer=on_gpu), model)
    # Host offload of the optimizer state (GPU only): Megatron's HybridDeviceOptimizer keeps the
    # fp32 master weights and Adam moments of that share on the CPU; it rides on the
    # precision-aware code path, so no second fp32 copy stays on the GPU.
    offload = t.optimizer_offload_fraction if on_gpu else 0.0
    from mcore_r1.parallel.cpu_compat import cuda_type_names

    settings = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min(t.min_lr, lr), weight_decay=t.weight_decay,
        clip_grad=t.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        params_dtype=dtype, use_distributed_optimizer=on_gpu, optimizer_cpu_offload=offload > 0,
        optimizer_offload_fraction=offload, use_precision_aware_optimizer=offload > 0)
    with cuda_type_names():  # its bf16/fp16 wrapper accepts only CUDA type names
        optimizer = get_megatron_optimizer(settings, [ddp])
    # Megatron's schedule all-reduces DP gradients (and tied embeddings over PP) through these.
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    steps = max(1, total_updates)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if t.lr_warmup_steps else lr, max_lr=lr, min_lr=min(t.min_lr, lr),
        lr_warmup_steps=min(t.lr_warmup_steps, steps - 1), lr_decay_steps=steps,
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant")
    return ddp, optimizer, scheduler


class NonFiniteError(RuntimeError):
    """NaN/Inf in a loss or gradient norm under `trainer.nonfinite=stop`."""


def guarded_step(optimizer, name: str, loss: float, policy: str) -> tuple[bool, float]:
    """Step `optimizer` unless the loss or the gradient norm is NaN/Inf; returns (stepped, norm).

    The norm is computed before the step because Megatron's clipping does not stop a NaN norm
    (`coeff < 1` is false for NaN) and Adam would write NaN into every weight. The norm is
    reduced over the model-parallel group and the gradients over DP, so all ranks agree on the
    decision. `policy` skip drops the update (the scheduler still advances, as for an fp16
    overflow); stop raises naming the metric. Megatron's `step()` computes the norm again for
    clipping: one extra reduction, kept so its distributed-optimizer and offload paths stay its own.
    """
    import torch.distributed as dist

    optimizer.prepare_grads()
    norm = optimizer.get_grad_norm()
    norm = float(norm) if norm is not None else 0.0
    bad = [f"{name}/{key} = {value}" for key, value in (("loss", loss), ("grad_norm", norm))
           if not math.isfinite(value)]
    # Only the last pipeline stage sees the loss: every rank must take the same decision.
    from mcore_r1.parallel.device import get_device

    flag = torch.tensor([float(bool(bad))], device=get_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        ok, _, _ = optimizer.step()
        return bool(ok), norm
    if policy == "stop":
        seen = " and ".join(bad) or f"a non-finite {name} loss on another pipeline stage"
        raise NonFiniteError(f"{seen} (trainer.nonfinite=stop; trainer.nonfinite=skip drops such "
                             "updates instead)")
    optimizer.zero_grad()
    return False, norm


def _in_sample_order(rows: list[int], values: list, size: int) -> list:
    out: list = [None] * size
    for row, value in zip(rows, values):
        out[row] = value
    return out
