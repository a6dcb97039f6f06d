"""The RL loop: what `python -m mcore_r1.main` runs.

One step, on one screen (`Trainer.step`):

    rollout (vLLM, colocated) -> rewards (driver's pool) [-> dynamic sampling: more rounds]
    -> old-policy and reference log-probs (Megatron) -> advantages (driver)
    -> mini-batch updates (Megatron DDP + optimizer) -> refit (Megatron -> vLLM in place)
    -> metrics (console line, metrics.jsonl, TensorBoard)

Validation (greedy by default, `rollout.val_*`) runs before the first step and every
`trainer.val_every` steps on the test split. The driver holds the data, the reward pool and
the batch; the workers hold the models (`mcore_r1.workers.hybrid`).

Checkpoints (`save`) hold everything the next step depends on: the workers' weights,
optimizer, scheduler and RNG, and the driver's data position, KL controller, reward counters
and group counter. Rollouts draw from per-prompt seeds derived from (step, prompt), not from
an engine's running random stream, so a resumed run samples exactly what an uninterrupted
one would. `fit` stops after a step when asked (SIGTERM/SIGINT, `trainer.exit_after_steps`)
and saves first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mcore_r1 import algos
from mcore_r1.config.schema import Config
from mcore_r1.trainer.advantage import compute_advantages, mismatch_metrics
from mcore_r1.trainer.batch import BatchPlan, RolloutBatch, gather_by_dp
from mcore_r1.trainer.checkpoint import CheckpointError, CheckpointManager
from mcore_r1.trainer.metrics import MetricsLogger, PhaseTimer
from mcore_r1.trainer.placement import first_of
from mcore_r1.trainer.rollout import Rollout

class Trainer:
    def __init__(self, cfg: Config, workers, infos, rewards, train_set, val_set, sampler, run_dir: Path,
                 checkpoints: Optional[CheckpointManager] = None, model_dir: Optional[Path] = None,
                 run_id: str = ""):
        self.cfg, self.workers, self.infos, self.rewards = cfg, workers, infos, rewards
        self.run_dir, self.checkpoints, self.model_dir, self.run_id = run_dir, checkpoints, model_dir, run_id
        self.stop_signal: Optional[int] = None  # set by the signal handler: stop after this step
        self.timer = PhaseTimer()  # the current step's: names the phase a failure came from
        self.current_step = 0
        self.last_val: dict = {}
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
        timer = self.timer = PhaseTimer()
        self.rollout.begin_step(step, timer)
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
                old = entropy = None  # on-policy: the update's own log-probs are the old ones
                if not self.on_policy(plan):
                    with timer("logprobs/old"):
                        old, entropy = self.log_probs("actor", batch, plan, with_entropy=True)
                ref = None
                if self.use_ref:
                    with timer("logprobs/ref"):
                        ref = self.log_probs("ref", batch, plan)[0]
                values = self.per_response("values", "values", batch, plan) if self.use_critic else None
            if self.nonfinite(step, {"actor/old_log_probs": old, "ref/log_probs": ref, "critic/values": values}):
                return {**metrics, **self.rewards.metrics(batch.rewards), "train/skipped": 1.0}
            with timer("advantage"):
                data, returns, adv_metrics = compute_advantages(self.cfg, batch, old, ref, self.kl_ctrl,
                                                                baselines, values)
                if self.use_critic:
                    data.update(values=values, returns=returns)
            with timer("update"):
                update_metrics, own_log_probs = self.update(plan, data)
            if old is None:
                old, entropy = (batch.matrix(gather_by_dp(own_log_probs, plan, len(batch), key))
                                for key in ("logp", "entropy"))
                # non-finite outputs made the loss non-finite: the workers dropped the update
                if self.nonfinite(step, {"actor/old_log_probs": old}):
                    return {**metrics, **self.rewards.metrics(batch.rewards), "train/skipped": 1.0}
                adv_metrics.update(mismatch_metrics(batch, old))
            with timer("refit"):
                refit_metrics = first_of(self.workers.call("refit"))
        metrics.update(self.rewards.metrics(batch.rewards))
        metrics.update(response_metrics(batch, data["response_mask"], entropy))
        metrics.update({**adv_metrics, **update_metrics, **refit_metrics, **timer.metrics()})
        metrics["perf/tokens_per_s"] = metrics["perf/tokens"] / max(timer.seconds["step"], 1e-9)
        return metrics

    def nonfinite(self, step: int, tensors: dict) -> bool:
        """True (skip this step) when a model output is NaN/Inf under `trainer.nonfinite=skip`;
        raises naming it under `stop`. Padding is 0, so any NaN/Inf is at a real position."""
        from mcore_r1.workers.hybrid import NonFiniteError

        bad = [f"{name} ({int((~torch.isfinite(t)).sum())} values)" for name, t in tensors.items()
               if t is not None and not torch.isfinite(t).all()]
        if not bad:
            return False
        what = f"step {step}: non-finite {', '.join(bad)}"
        if self.cfg.trainer.nonfinite == "stop":
            raise NonFiniteError(f"{what} (trainer.nonfinite=stop; skip drops such steps instead)")
        print(f"mcore_r1: {what}: step skipped, no update (trainer.nonfinite=skip)", flush=True)
        return True

    def log_probs(self, which: str, batch: RolloutBatch, plan: BatchPlan,
                  with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        results = self.workers.call("log_probs", which, with_entropy)
        logp = batch.matrix(gather_by_dp(results, plan, len(batch), "logp"))
        entropy = batch.matrix(gather_by_dp(results, plan, len(batch), "entropy")) if with_entropy else None
        return logp, entropy

    def on_policy(self, plan: BatchPlan) -> bool:
        """One optimizer step on this rollout batch with nothing else reading the old
        log-probs first: the update computes them itself (`trainer.old_logprobs=auto`)."""
        a = self.cfg.algorithm
        return (self.cfg.trainer.old_logprobs == "auto" and a.ppo_epochs == 1
                and plan.num_mini_batches == 1 and a.rollout_is == "off"
                and (a.use_kl_loss or a.kl_coef == 0))  # KL in the reward reads them first

    def per_response(self, method: str, key: str, batch: RolloutBatch, plan: BatchPlan) -> torch.Tensor:
        return batch.matrix(gather_by_dp(self.workers.call(method), plan, len(batch), key))

    def update(self, plan: BatchPlan, data: dict) -> tuple[dict, list]:
        """`algorithm.ppo_epochs` passes over the mini-batches; one optimizer step each.
        Returns the metrics and, for an on-policy step, the workers' own log-probs."""
        rank_rows = {i.dp_rank: plan.rank_rows(i.dp_rank) for i in self.infos}
        updates: list[dict] = []
        own_log_probs: list = []
        for _ in range(self.cfg.algorithm.ppo_epochs):
            for m in range(plan.num_mini_batches):
                local = plan.local_rows(m)
                calls = []
                for info in self.infos:
                    rows = [rank_rows[info.dp_rank][r] for r in local]
                    calls.append((local, {k: v[rows] for k, v in data.items() if v is not None}))
                reports = [r for r in self.workers.call_each("train_mini_batch", calls) if r]
                own_log_probs = [r.pop("on_policy") for r in reports if "on_policy" in r]
                merged = {k: sum(r[k] for r in reports) / len(reports) for k in reports[0]}
                merged["actor/loss"] = sum(r["actor/loss"] for r in reports)  # DP shares add up
                updates.append(merged)
        return {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}, own_log_probs

    def validate(self, step: int) -> dict:
        """Metrics on the validation prompts; every generation goes to validation/step_N.jsonl."""
        self.rollout.timer = self.timer  # generation and scoring seconds as validate/* phases
        items = list(self.val_set.items)
        batch = self.rollout.generate_scored(items, list(range(len(items))),
                                             self.rollout.options(validation=True))
        write_generations(self.run_dir / "validation" / f"step_{step:06d}.jsonl", batch)
        metrics = self.rewards.metrics(batch.rewards, prefix="val/")
        metrics["val/response_length"] = sum(map(len, batch.response_ids)) / len(batch)
        return metrics

    def fit(self, logger: MetricsLogger, start_step: int = 0) -> int:
        """Train from `start_step` to the end, or until asked to stop; returns the last step.
        A worker failure is re-raised with the step and phase it happened in."""
        self.current_step = start_step
        try:
            return self._fit(logger, start_step)
        except Exception as err:
            if not hasattr(err, "with_context"):
                raise
            raise err.with_context(f"step {self.current_step}, phase "
                                   f"{self.timer.failed_in or 'between phases'}") from None

    def _fit(self, logger: MetricsLogger, start_step: int) -> int:
        t = self.cfg.trainer
        if t.val_every and start_step == 0:
            self.timer = PhaseTimer()
            with self.timer("validate"):
                logger.log(0, self.validate(0), advance=False)
        step = start_step
        for step in range(start_step + 1, t.total_steps + 1):
            self.current_step = step
            metrics = self.step(step)
            self.last_val = {}
            if t.val_every and (step % t.val_every == 0 or step == t.total_steps):
                timer = self.timer = PhaseTimer()
                with timer("validate"):
                    self.last_val = self.validate(step)
                metrics.update(self.last_val)
                metrics.update(timer.metrics())
            logger.log(step, metrics)
            stopping = self.stop_signal is not None or (
                t.exit_after_steps > 0 and step - start_step >= t.exit_after_steps)
            if stopping or step == t.total_steps or (t.save_every and step % t.save_every == 0):
                self.save(step, logger)
            if stopping:
                break
        return step

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self, step: int) -> dict:
        p = self.cfg.parallel
        return {"step": step, "run_id": self.run_id, "sampler": self.sampler.state_dict(),
                "kl_coef": self.kl_ctrl.value, "reward_counters": self.rewards.counters,
                "next_group": self.rollout.next_group, "val_metrics": self.last_val,
                "layout": {"world": self.cfg.trainer.nnodes * self.cfg.trainer.devices_per_node,
                           "tp": p.tp, "pp": p.pp, "cp": p.cp}}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctrl.value = float(state["kl_coef"])
        self.rewards.restore_counters(state["reward_counters"])
        self.rollout.next_group = int(state["next_group"])

    def save(self, step: int, logger: MetricsLogger) -> None:
        """Checkpoint after `step`; a failure leaves the previous checkpoint as it was."""
        if self.checkpoints is None:
            return
        timer = self.timer = PhaseTimer()
        with timer("save"):
            staging = self.checkpoints.begin(step)
            try:
                self.workers.call("save_checkpoint", str(staging))
                final = self.checkpoints.finish(staging, step, self.state_dict(step), self.model_dir)
            except Exception as err:
                # Measured before the partial files are removed: a full disk is the usual cause,
                # and torch's writer reports it only as "unexpected pos" in its zip container.
                free = self.checkpoints.free_mib()
                self.checkpoints.abandon(staging)
                raise CheckpointError(
                    f"saving the checkpoint of step {step} failed ({err}); {free:.1f} MiB free on "
                    f"the filesystem of {self.checkpoints.root}; {self.checkpoints.describe_previous()}"
                ) from err
        logger.write(f"checkpoint: {final} ({timer.seconds['save']:.1f} s)")

    def resume(self, path: Path, state: dict) -> None:
        """Load the checkpoint at `path` (whose trainer_state.json is `state`) into the workers
        and the driver."""
        notes = [n for n in self.workers.call("load_checkpoint", str(path)) if n]
        for note in notes:
            print(f"mcore_r1: {note}", flush=True)
        self.load_state_dict(state)


def write_generations(path: Path, batch: RolloutBatch) -> None:
    """One JSON line per response (source row, answer, response, rewards), written atomically."""
    import json

    from mcore_r1.files import write_atomic

    write_atomic(path, "".join(
        json.dumps({"source": item.where, "answer": item.answer, "response": text,
                    "finish_reason": finish, "rewards": reward}, ensure_ascii=False) + "\n"
        for item, text, reward, finish in zip(batch.items, batch.texts, batch.rewards, batch.finish)))


def response_metrics(batch: RolloutBatch, mask: torch.Tensor, entropy: torch.Tensor) -> dict:
    lengths = mask.sum(-1).float()
    prompt_tokens = sum(len(item.prompt_token_ids) for item in batch.items)
    return {"response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
            "response/clip_ratio": sum(f == "length" for f in batch.finish) / len(batch),
            "actor/entropy": float(entropy[mask].mean()),
            "perf/tokens": float(lengths.sum()) + prompt_tokens,
            "batch/responses": float(len(batch))}
