"""Command line: `python -m mcore_r1.eval [model.path=DIR] [data=...] [key=value ...]`.

Hydra composes `conf/eval.yaml` (the model, data, rollout and reward groups of training plus
eval-only fields of `EvalConfig`); `--cfg job` prints the composed config. Bad input (missing
checkpoint, Megatron checkpoint, bad data row, broken reward function, k > n) exits with
status 2 and one readable message.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from mcore_r1.config import CONF_DIR, ConfigError, register_configs


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base=None)
def _run(cfg: DictConfig) -> None:
    from mcore_r1.data.errors import DataError
    from mcore_r1.eval.runner import EvalError, run_eval
    from mcore_r1.rewards.loader import RewardFunctionError

    config = OmegaConf.to_object(cfg)
    logging.getLogger("mcore_r1").setLevel(logging.INFO)
    try:
        out_dir = run_eval(config)
    except (EvalError, ConfigError, DataError, RewardFunctionError, FileNotFoundError) as err:
        print(f"mcore_r1.eval: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"mcore_r1.eval: wrote {out_dir / 'metrics.json'} and {out_dir / 'samples.jsonl'}")


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
