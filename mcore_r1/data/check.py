"""`python -m mcore_r1.data.check [+experiment=NAME] [data.key=value ...]`: inspect a dataset.

Composes the *training* config (so it sees exactly what a run would), loads the train and
test splits with the model's processor and prints, per split: rows kept, dropped as over-long
and skipped as bad; prompt lengths in tokens (image tokens included); images per prompt; and
the first prompt as the model will see it, with its answer. Bad rows raise the same errors
naming file and row that training would raise, before any GPU is involved.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import hydra
from omegaconf import DictConfig

from mcore_r1.config import CONF_DIR, ConfigError, register_configs, to_config


def split_report(name: str, dataset: Any) -> str:
    lengths = [len(item.prompt_token_ids) for item in dataset.items]
    images = Counter(len(item.images) for item in dataset.items)
    first = dataset.items[0]
    lines = [
        f"== {name}: {dataset.spec}",
        f"rows: {dataset.stats.summary('read')}",
        f"prompt tokens: min {min(lengths)}, mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)} "
        f"(limit {dataset.cfg.max_prompt_length})",
        "images per prompt: " + ", ".join(f"{k}: {v} rows" for k, v in sorted(images.items())),
        f"first prompt ({first.where}, answer {first.answer!r}):",
        first.prompt,
    ]
    return "\n".join(lines)


def report(data_cfg: Any, model_dir: Any, splits: tuple[str, ...] = ("train", "test")) -> str:
    from mcore_r1.data.dataset import PromptDataset, load_processor, resolve_source

    processor = load_processor(model_dir, data_cfg)
    parts = []
    for split in splits:
        if split != "train" and data_cfg.train_files and not data_cfg.val_files:
            parts.append(f"== {split}: none configured (data.val_files is empty)")
            continue
        parts.append(split_report(split, PromptDataset(resolve_source(data_cfg, split), data_cfg, processor)))
    return "\n\n".join(parts)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _run(cfg: DictConfig) -> None:
    from mcore_r1.data.errors import DataError
    from mcore_r1.eval.runner import EvalError, prepare_model_dir
    from mcore_r1.eval.cache import default_cache_dir

    config = to_config(cfg)
    try:
        print(report(config.data, prepare_model_dir(config.model, default_cache_dir(), config.data)))
    except (ConfigError, DataError, EvalError, FileNotFoundError, ValueError) as err:
        print(f"mcore_r1.data.check: {err}", file=sys.stderr)
        sys.exit(2)


# A read-only inspection: no run directory, no .hydra/ copy, no log file; logs go to stdout.
NO_RUN_DIR = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def main() -> None:
    register_configs()
    sys.argv += NO_RUN_DIR
    _run()


if __name__ == "__main__":
    main()
