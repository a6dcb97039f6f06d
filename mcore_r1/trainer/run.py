"""Bringing a run up and down: data, reward pool, Ray workers, resume, signals, shutdown.

`run_training(cfg)` is what `python -m mcore_r1.main` calls. Order matters for "nothing is lost
or half-started": the config was validated by the caller; the checkpoint to resume from is
found and verified before Ray starts (a bad `trainer.resume` fails in seconds); the reward is
probed before any worker starts; workers are placed only if the cluster fits.

Stopping: the first SIGTERM or SIGINT (preemption, Ctrl-C) lets the current step finish, saves
a checkpoint and returns; a second one aborts at once (the previous checkpoint stays as it
was). `trainer.exit_after_steps` stops the same way after N steps of this invocation.

A resumed run continues in the same run directory: metrics.jsonl keeps the records up to the
checkpoint's step and drops later ones (they belong to steps that will be redone), TensorBoard
purges them likewise, and the run id stays the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mcore_r1.config.schema import Config
from mcore_r1.files import write_atomic
from mcore_r1.trainer.checkpoint import CheckpointManager, read_state


@dataclass
class RunResult:
    run_dir: Path
    last_step: int
    stop_signal: Optional[int] = None  # the signal that stopped the run early, if any
    checkpoint: Optional[Path] = None  # the newest complete checkpoint at the end


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


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics.jsonl records after `step` (atomically): a resumed run redoes those steps."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
             if line.strip() and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(lines))


@contextlib.contextmanager
def stop_on_signals(trainer):
    """First SIGTERM/SIGINT: finish the step, save, stop. Second: abort now."""
    def handler(signum, frame):
        if trainer.stop_signal is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without saving")
        trainer.stop_signal = signum
        print(f"\nmcore_r1: {signal.Signals(signum).name} received: finishing the current step "
              f"({trainer.current_step}), saving a checkpoint, then stopping (send it again to "
              "abort at once)", flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_training(cfg: Config) -> RunResult:
    """Build everything, resume if asked, train, and shut down; see the module docstring."""
    from mcore_r1.config.validate import ensure_model_dir
    from mcore_r1.data import PromptDataset, load_processor, resolve_source
    from mcore_r1.data.sampler import ResumableSampler
    from mcore_r1.rewards import RewardManager
    from mcore_r1.trainer.loop import Trainer
    from mcore_r1.trainer.metrics import MetricsLogger
    from mcore_r1.trainer.placement import WorkerGroup, start_ray

    t = cfg.trainer
    run_dir = Path(t.output_dir).absolute()
    checkpoints = CheckpointManager(run_dir / "checkpoints", t.keep_last, t.best_metric)
    resume_from = checkpoints.resolve(t.resume)
    state = read_state(resume_from) if resume_from else None
    start_step = int(state["step"]) if state else 0
    run_id = state["run_id"] if state else uuid.uuid4().hex[:12]

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
            run_dir.mkdir(parents=True, exist_ok=True)
            workers.write_placement(run_dir / "placement.json")
            keep_metrics_until(run_dir / "metrics.jsonl", start_step)
            logger = MetricsLogger(run_dir, cfg.logger.backends, t.total_steps, start_step=start_step,
                                   log_every=cfg.logger.log_every)
            trainer = Trainer(cfg, workers, infos, rewards, train_set, val_set, sampler, run_dir,
                              checkpoints if t.save_checkpoints else None, model_dir, run_id)
            logger.write(f"run {run_id}: directory {run_dir}\nmodel: {model_dir}\n"
                         + describe_batches(cfg, infos[0].dp_size, infos[0].num_replicas)
                         + "\n" + workers.describe_placement())
            if resume_from is not None:
                trainer.resume(resume_from, state)
                logger.write(f"resumed from {resume_from} at step {start_step}")
            with stop_on_signals(trainer):
                last = trainer.fit(logger, start_step)
        finally:
            if logger is not None:
                logger.close()
            workers.shutdown()
    newest = checkpoints.newest_complete(checkpoints.root) if t.save_checkpoints else None
    return RunResult(run_dir, last, trainer.stop_signal, newest)


def _cluster_has_gpus() -> bool:
    import ray

    if os.environ.get("MCORE_R1_FORCE_CPU") == "1":
        return False
    return ray.cluster_resources().get("GPU", 0) > 0
