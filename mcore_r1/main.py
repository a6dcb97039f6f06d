"""Command-line entry point: `python -m mcore_r1.main [+experiment=NAME] [key=value ...]`.

Hydra composes `conf/` on top of the dataclass schema; `--cfg job` prints the composed config
without running anything. The config is validated before anything heavy starts; an impossible
setting (or a layout the Ray cluster cannot place) exits with status 2 and a message that shows
the arithmetic. Then `mcore_r1.trainer.run.run_training` runs the RL loop.

Exit status: 0 done (or stopped by `trainer.exit_after_steps`, checkpoint saved); 1 a failure
during training (a worker died, NaN under `trainer.nonfinite=stop`, a failed save); 2 bad
config, unplaceable layout, or an unusable checkpoint to resume from; 128+N stopped by signal N
after saving a checkpoint.
"""

from __future__ import annotations

import signal
import sys

import hydra
from omegaconf import DictConfig

from mcore_r1.config import CONF_DIR, ConfigError, register_configs, to_config, validate


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _run(cfg: DictConfig) -> None:
    config = to_config(cfg)
    try:
        validate(config, local_run=True)
    except ConfigError as err:
        print(f"mcore_r1: {err}", file=sys.stderr)
        sys.exit(2)
    from mcore_r1.trainer.checkpoint import CheckpointError
    from mcore_r1.trainer.placement import PlacementError, WorkerFailure
    from mcore_r1.trainer.run import run_training
    from mcore_r1.workers.hybrid import NonFiniteError

    try:
        result = run_training(config)
    except (PlacementError, CheckpointError) as err:
        print(f"mcore_r1: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, PlacementError) or not err.__cause__ else 1)
    except NonFiniteError as err:
        print(f"mcore_r1: {err}", file=sys.stderr)
        sys.exit(1)
    except WorkerFailure as err:  # the workers were already killed by run_training's cleanup
        print(f"mcore_r1: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    where = f"; checkpoint {result.checkpoint}" if result.checkpoint else ""
    if result.stop_signal is not None:
        name = signal.Signals(result.stop_signal).name
        print(f"mcore_r1: stopped by {name} after step {result.last_step}{where}; resume with "
              f"trainer.output_dir={result.run_dir} (trainer.resume=auto)", file=sys.stderr, flush=True)
        sys.exit(128 + result.stop_signal)
    if result.last_step < config.trainer.total_steps:  # trainer.exit_after_steps
        print(f"mcore_r1: stopped after step {result.last_step} (trainer.exit_after_steps){where}; "
              f"continue with trainer.output_dir={result.run_dir}", flush=True)
        return
    print(f"mcore_r1: done at step {result.last_step}; metrics in {result.run_dir / 'metrics.jsonl'}"
          f"{where}", flush=True)


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
