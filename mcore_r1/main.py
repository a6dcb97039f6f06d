"""Command-line entry point: `python -m mcore_r1.main [+experiment=NAME] [key=value ...]`.

Hydra composes `conf/` on top of the dataclass schema; `--cfg job` prints the composed config
without running anything. The config is validated before anything heavy starts; an impossible
setting exits with status 2 and a message that shows the arithmetic.

Until the RL trainer lands (issue #8) the job run here is the smoke job (`mcore_r1.smoke`).
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
    from mcore_r1.smoke import run_smoke_job

    run_smoke_job(config, shape)


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
