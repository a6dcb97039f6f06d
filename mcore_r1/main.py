"""Command-line entry point: `python -m mcore_r1.main [+experiment=NAME] [key=value ...]`.

Hydra composes `conf/` on top of the dataclass schema; `--cfg job` prints the composed config
without running anything. The config is validated before anything heavy starts; an impossible
setting (or a layout the Ray cluster cannot place) exits with status 2 and a message that shows
the arithmetic. Then `mcore_r1.trainer.loop.run_training` runs the RL loop.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mcore_r1.config import CONF_DIR, ConfigError, register_configs, to_config, validate


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _run(cfg: DictConfig) -> None:
    config = to_config(cfg)
    try:
        shape = validate(config)
    except ConfigError as err:
        print(f"mcore_r1: {err}", file=sys.stderr)
        sys.exit(2)
    from mcore_r1.trainer.loop import run_training
    from mcore_r1.trainer.placement import PlacementError

    try:
        run_dir = run_training(config)
    except PlacementError as err:
        print(f"mcore_r1: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"mcore_r1: done; metrics in {run_dir / 'metrics.jsonl'}", flush=True)


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
