"""The RL loop: what `python -m mcore_r1.main` runs.

One step, on one screen (`Trainer.step`):

    rollout (vLLM, colocated) -> rewards (driver's pool) [-> dynamic sampling: more rounds]
    -> old-policy and reference log-probs (Megatron) -> advantages (driver)
    -> mini-batch updates (Megatron DDP + optimizer) -> refit (Megatron -> vLLM in place)
    -> metrics (console line, metrics.jsonl, TensorBoard)

Validation (greedy by default, `rollout.val_*`) runs before the first step and every
`trainer.val_every` steps on the test split. The driver holds the data, the reward pool and
the batch; the workers hold the models (`mcore_r1.workers.hybrid`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from mcore_r1 import algos
from mcore_r1.config.schema import Config
from mcore_r1.trainer.advantage import compute_advantages
from mcore_r1.trainer.batch import BatchPlan, RolloutBatch, gather_by_dp
from mcore_r1.trainer.metrics import MetricsLogger, PhaseTimer
from mcore_r1.trainer.placement import first_of
from mcore_r1.trainer.rollout import Rollout

log = logging.getLogger("mcore_r1.trainer")


class Trainer:
    def __init__(self, cfg: Config, workers, infos, rewards, train_set, val_set, sampler, run_dir: Path):
        self.cfg, self.workers, self.infos, self.rewards = cfg, workers, infos, rewards
        self.run_dir = run_dir
        self.train_set, self.val_set, self.sampler = train_set, val_set, sampler
        self.rollout = Rollout(workers, infos, rewards, cfg)
        self.dp = infos[0].dp_size
        a = cfg.algorithm
        self.use_ref = a.kl_coef > 0
        self.use_critic = a.use_critic
        self.kl_ctrl = algos.make_kl_controller(a.kl_ctrl, a.kl_coef, a.kl_target, a.kl_horizon)

    def draw(self) -> tuple[list, list[int]]:
        keys = self.sampler.next_batch(self.cfg.data.prompts_per_step)
        return [self.train_set[k] for k in keys], keys

    def step(self, step: int) -> dict:
        timer = PhaseTimer()
        with timer("step"):
            with timer("rollout"):
                batch, metrics = self.rollout.fill(self.draw)
                baselines = (self.rollout.greedy_baselines(batch) if self.cfg.algorithm.advantage_estimator
                             in algos.NEEDS_GREEDY_BASELINE else None)
            with timer("logprobs"):
                plan = BatchPlan.make(len(batch), self.cfg.trainer.mini_batch_size, self.dp,
                                      seed=self.cfg.trainer.seed * 1_000_003 + step)
                self.workers.call_each("set_batch", [(batch.sequences(plan.rank_rows(i.dp_rank)),)
                                                     for i in self.infos])
                old, entropy = self.log_probs("actor", batch, plan, with_entropy=True)
                ref = self.log_probs("ref", batch, plan)[0] if self.use_ref else None
                values = self.per_response("values", "values", batch, plan) if self.use_critic else None
            with timer("advantage"):
                data, returns, adv_metrics = compute_advantages(self.cfg, batch, old, ref, self.kl_ctrl,
                                                                baselines, values)
                if self.use_critic:
                    data.update(values=values, returns=returns)
            with timer("update"):
                update_metrics = self.update(plan, data)
            with timer("refit"):
                refit_metrics = first_of(self.workers.call("refit"))
        metrics.update(self.rewards.metrics(batch.rewards))
        metrics.update(response_metrics(batch, data["response_mask"], entropy))
        metrics.update({**adv_metrics, **update_metrics, **refit_metrics, **timer.metrics()})
        metrics["perf/tokens_per_s"] = metrics["perf/tokens"] / max(timer.seconds["step"], 1e-9)
        return metrics

    def log_probs(self, which: str, batch: RolloutBatch, plan: BatchPlan,
                  with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        results = self.workers.call("log_probs", which, with_entropy)
        logp = batch.matrix(gather_by_dp(results, plan, len(batch), "logp"))
        entropy = batch.matrix(gather_by_dp(results, plan, len(batch), "entropy")) if with_entropy else None
        return logp, entropy

    def per_response(self, method: str, key: str, batch: RolloutBatch, plan: BatchPlan) -> torch.Tensor:
        return batch.matrix(gather_by_dp(self.workers.call(method), plan, len(batch), key))

    def update(self, plan: BatchPlan, data: dict) -> dict:
        """`algorithm.ppo_epochs` passes over the mini-batches; one optimizer step each."""
        rank_rows = {i.dp_rank: plan.rank_rows(i.dp_rank) for i in self.infos}
        updates: list[dict] = []
        for _ in range(self.cfg.algorithm.ppo_epochs):
            for m in range(plan.num_mini_batches):
                local = plan.local_rows(m)
                calls = []
                for info in self.infos:
                    rows = [rank_rows[info.dp_rank][r] for r in local]
                    calls.append((local, {k: v[rows] for k, v in data.items()}))
                reports = [r for r in self.workers.call_each("train_mini_batch", calls) if r]
                merged = {k: sum(r[k] for r in reports) / len(reports) for k in reports[0]}
                merged["actor/loss"] = sum(r["actor/loss"] for r in reports)  # DP shares add up
                updates.append(merged)
        return {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}

    def validate(self, step: int) -> dict:
        """Metrics on the validation prompts; every generation goes to validation/step_N.jsonl."""
        items = list(self.val_set.items)
        batch = self.rollout.generate_scored(items, list(range(len(items))),
                                             self.rollout.options(validation=True))
        write_generations(self.run_dir / "validation" / f"step_{step:06d}.jsonl", batch)
        metrics = self.rewards.metrics(batch.rewards, prefix="val/")
        metrics["val/response_length"] = sum(map(len, batch.response_ids)) / len(batch)
        return metrics

    def fit(self, logger: MetricsLogger, start_step: int = 0) -> None:
        t = self.cfg.trainer
        if t.val_every:
            logger.log(start_step, self.validate(start_step), advance=False)
        for step in range(start_step + 1, t.total_steps + 1):
            metrics = self.step(step)
            if t.val_every and (step % t.val_every == 0 or step == t.total_steps):
                timer = PhaseTimer()
                with timer("validate"):
                    metrics.update(self.validate(step))
                metrics.update(timer.metrics())
            logger.log(step, metrics)


def write_generations(path: Path, batch: RolloutBatch) -> None:
    """One JSON line per response (source row, answer, response, rewards), written atomically."""
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for item, text, reward, finish in zip(batch.items, batch.texts, batch.rewards, batch.finish):
            f.write(json.dumps({"source": item.where, "answer": item.answer, "response": text,
                                "finish_reason": finish, "rewards": reward}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def response_metrics(batch: RolloutBatch, mask: torch.Tensor, entropy: torch.Tensor) -> dict:
    lengths = mask.sum(-1).float()
    prompt_tokens = sum(len(item.prompt_token_ids) for item in batch.items)
    return {"response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
            "response/clip_ratio": sum(f == "length" for f in batch.finish) / len(batch),
            "actor/entropy": float(entropy[mask].mean()),
            "perf/tokens": float(lengths.sum()) + prompt_tokens,
            "batch/responses": float(len(batch))}


def describe_batches(cfg: Config, dp: int, num_replicas: int) -> str:
    """The batch-size arithmetic of this run, printed at start-up."""
    d, r, t, p = cfg.data, cfg.rollout, cfg.trainer, cfg.parallel
    responses = d.prompts_per_step * r.n
    minis = responses // t.mini_batch_size
    world = t.nnodes * t.devices_per_node
    return (f"batch: {d.prompts_per_step} prompts/step x {r.n} responses = {responses} responses/step; "
            f"mini-batch {t.mini_batch_size} -> {minis} update(s)/step x {cfg.algorithm.ppo_epochs} "
            f"epoch(s) = {minis * cfg.algorithm.ppo_epochs * t.total_steps} updates in {t.total_steps} "
            f"steps; {t.mini_batch_size // dp} responses per DP rank per update, micro-batches of "
            f"<= {t.micro_batch_tokens} tokens\nlayout: world {world} = DP {dp} x TP {p.tp} x PP {p.pp} "
            f"x CP {p.cp}; rollout: {num_replicas} vLLM replica(s) of TP {r.tp}")


def total_updates(cfg: Config) -> int:
    responses = cfg.data.prompts_per_step * cfg.rollout.n
    return cfg.trainer.total_steps * (responses // cfg.trainer.mini_batch_size) * cfg.algorithm.ppo_epochs


def run_training(cfg: Config) -> Path:
    """Build everything, train, and return the run directory (metrics.jsonl, tensorboard/)."""
    from mcore_r1.config.validate import ensure_model_dir
    from mcore_r1.data import PromptDataset, load_processor, resolve_source
    from mcore_r1.data.sampler import ResumableSampler
    from mcore_r1.rewards import RewardManager
    from mcore_r1.trainer.placement import WorkerGroup, start_ray

    run_dir = Path(cfg.trainer.output_dir).absolute()
    model_dir = ensure_model_dir(cfg.model, cfg.data).absolute()
    processor = load_processor(model_dir, cfg.data)
    train_set = PromptDataset(resolve_source(cfg.data, "train"), cfg.data, processor)
    val_set = PromptDataset(resolve_source(cfg.data, "test"), cfg.data, processor,
                            limit=cfg.data.val_prompts or None)
    sampler = ResumableSampler(len(train_set), cfg.data.seed, cfg.data.shuffle)
    max_images = max(len(item.images) for item in train_set.items + val_set.items)
    # The reward is loaded and probed before any worker starts: a broken file fails in seconds.
    with RewardManager(cfg.reward, max_response_length=cfg.rollout.max_new_tokens) as rewards:
        start_ray()
        workers = WorkerGroup(cfg, str(model_dir), use_gpu=_cluster_has_gpus())
        logger = None
        try:
            infos = workers.call("setup", total_updates(cfg), max_images)
            logger = MetricsLogger(run_dir, cfg.logger.backends, cfg.trainer.total_steps,
                                   log_every=cfg.logger.log_every)
            logger.write(f"run directory: {run_dir}\nmodel: {model_dir}\n"
                         + describe_batches(cfg, infos[0].dp_size, infos[0].num_replicas))
            Trainer(cfg, workers, infos, rewards, train_set, val_set, sampler, run_dir).fit(logger)
        finally:
            if logger is not None:
                logger.close()
            workers.shutdown()
    return run_dir


def _cluster_has_gpus() -> bool:
    import os

    import ray

    if os.environ.get("MCORE_R1_FORCE_CPU") == "1":
        return False
    return ray.cluster_resources().get("GPU", 0) > 0
