"""The evaluation job: load a dataset split, generate with vLLM, score, write metrics.

Steps of `run_eval`:

1. resolve the checkpoint: a Hugging Face directory, the tiny model (built offline if
   missing), or an mcore_r1 Megatron checkpoint, converted to HF once by
   tools/convert_hf_mcore.py and cached; other Megatron checkpoints are refused with advice;
2. load the split with the model's processor (`mcore_r1.data`), exactly as training does;
3. look the run up in the cache (`cache`); on a hit, copy the stored files and stop;
4. generate ``rollout.val_n`` samples per prompt with vLLM (`mcore_r1.rollout.engine`), after
   checking vLLM tokenised every prompt exactly as the data loader did;
5. score with the configured reward (`mcore_r1.rewards.RewardManager`: process pool, timeouts);
6. write ``samples.jsonl`` (one line per sample) and ``metrics.json`` (`metrics.summarize`
   plus reward component means and failure counters) to the cache and the output directory.

A sample is correct when its reward's ``accuracy`` component is >= 0.5, or, for rewards
without one, when ``overall >= correct_threshold``. Calibration metrics use the reward's
``confidence`` component when it has one (missing values count as 0) and are null otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from mcore_r1.eval.cache import (cache_key, dataset_fingerprint, default_cache_dir, file_sha256_if_path,
                                 model_fingerprint, publish_dir)
from mcore_r1.eval.metrics import summarize
from mcore_r1.files import write_atomic

log = logging.getLogger("mcore_r1.eval")

SAMPLING_FIELDS = ("val_n", "val_temperature", "top_p", "top_k", "max_new_tokens", "seed")


class EvalError(ValueError):
    """A problem with the evaluation's inputs, reported to the user without a traceback."""


MCORE_META = "mcore_r1_checkpoint.json"  # marks an mcore_r1 Megatron checkpoint (models/convert.py)
CONVERTER = Path(__file__).resolve().parents[2] / "tools" / "convert_hf_mcore.py"


def prepare_model_dir(model_cfg: Any, cache_root: Path, data_cfg: Any = None) -> Path:
    """The HF checkpoint to evaluate: the given one, the tiny model (built if missing), or an
    mcore_r1 Megatron checkpoint converted to HF once and kept under `cache_root`."""
    from mcore_r1.config.validate import ensure_model_dir

    model_dir = ensure_model_dir(model_cfg, data_cfg)
    if (model_dir / "config.json").is_file():
        return model_dir
    if (model_dir / MCORE_META).is_file():
        return megatron_to_hf(model_dir, cache_root)
    if is_foreign_megatron_checkpoint(model_dir):
        raise EvalError(f"{model_dir} is a Megatron checkpoint not written by mcore_r1 (no {MCORE_META}); "
                        "evaluation reads Hugging Face checkpoints and mcore_r1 Megatron checkpoints. "
                        "Convert it to Hugging Face format first, then pass model.path=<hf dir>")
    raise EvalError(f"model.path={str(model_dir)!r} is not a Hugging Face checkpoint (no config.json)")


def is_foreign_megatron_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / "latest_checkpointed_iteration.txt").is_file()
                              or any(path.glob("iter_*")) or (path / "common.pt").is_file()
                              or (path / ".metadata").is_file())


def megatron_to_hf(mcore_dir: Path, cache_root: Path) -> Path:
    """Convert with tools/convert_hf_mcore.py in a subprocess (its Megatron world must not share
    this process with vLLM's); the result is cached by the checkpoint's file fingerprint."""
    import subprocess
    import sys

    key = cache_key({"megatron": model_fingerprint(mcore_dir, config_file=Path("hf") / "config.json")})
    out = cache_root / "converted_hf" / key
    if (out / "config.json").is_file():
        return out
    if not CONVERTER.is_file():
        raise EvalError(f"{mcore_dir} is a Megatron checkpoint but the converter {CONVERTER} is missing")
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting Megatron checkpoint %s to Hugging Face format at %s", mcore_dir, out)
    proc = subprocess.run([sys.executable, str(CONVERTER), "mcore-to-hf", "--mcore", str(mcore_dir),
                           "--out", str(out), "--overwrite"], capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "config.json").is_file():
        raise EvalError(f"converting {mcore_dir} to Hugging Face format failed (exit {proc.returncode}):\n"
                        + proc.stderr[-3000:])
    return out


def _check_settings(cfg: Any) -> None:
    if cfg.split not in ("train", "test"):
        raise EvalError(f"split={cfg.split!r} must be train or test")
    n = cfg.rollout.val_n
    bad = [k for k in cfg.k if not 1 <= int(k) <= n]
    if n < 1 or bad:
        raise EvalError(f"pass@k needs 1 <= k <= rollout.val_n={n}; k={list(cfg.k)} has {bad}: raise "
                        "rollout.val_n (and a temperature > 0 for distinct samples)")


def _settings(cfg: Any) -> dict:
    return {
        "split": cfg.split, "max_prompts": cfg.max_prompts, "k": [int(k) for k in cfg.k],
        "correct_threshold": cfg.correct_threshold,
        "sampling": {f: getattr(cfg.rollout, f) for f in SAMPLING_FIELDS},
        "reward": dataclasses.asdict(cfg.reward) if dataclasses.is_dataclass(cfg.reward) else dict(cfg.reward),
        "reward_file_sha256": file_sha256_if_path(cfg.reward.function),
    }


def _generate(model_dir: Path, cfg: Any, dataset: Any) -> list:
    from mcore_r1.data.dataset import is_multimodal_dir
    from mcore_r1.data.images import pixel_limits
    from mcore_r1.rollout.engine import VLLMGenerator

    limits = pixel_limits(cfg.data.min_pixels, cfg.data.max_pixels) if is_multimodal_dir(model_dir) else None
    engine = VLLMGenerator(model_dir, cfg.rollout, cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                           pixel_limits=limits,
                           max_images_per_prompt=max(len(item.images) for item in dataset.items))
    r = cfg.rollout
    results = engine.generate(dataset.items, n=r.val_n, temperature=r.val_temperature, top_p=r.top_p,
                              top_k=r.top_k, max_tokens=r.max_new_tokens)
    for item, result in zip(dataset.items, results):
        if result.prompt_token_ids != item.prompt_token_ids:
            raise RuntimeError(f"{item.where}: vLLM tokenised the prompt into {len(result.prompt_token_ids)} "
                               f"ids, the data loader into {len(item.prompt_token_ids)}: image size limits "
                               "or chat templates differ between training and rollout")
    return results


def _is_correct(result: dict, threshold: float) -> int:
    if "accuracy" in result:
        return int(result["accuracy"] >= 0.5)
    return int(result["overall"] >= threshold)


def _score(cfg: Any, manager: Any, dataset: Any, generations: list) -> tuple[list[dict], dict]:
    samples, where = [], []
    for p, (item, result) in enumerate(zip(dataset.items, generations)):
        for s, gen in enumerate(result.samples):
            samples.append({"prompt": item.prompt, "response": gen.text, "ground_truth": item.answer,
                            "response_length": len(gen.token_ids)})
            where.append((p, s, item.where, gen.finish_reason))
    rewards = manager.score(samples)
    reward_metrics = manager.metrics(rewards)
    records = []
    for (p, s, row, finish), sample, reward in zip(where, samples, rewards):
        records.append({"prompt_index": p, "sample_index": s, "source": row, "prompt": sample["prompt"],
                        "response": sample["response"], "answer": sample["ground_truth"],
                        "response_length": sample["response_length"], "finish_reason": finish,
                        "rewards": reward, "correct": _is_correct(reward, cfg.correct_threshold),
                        "confidence": reward.get("confidence")})
    return records, reward_metrics


def _metrics(records: list[dict], ks: list[int], reward_metrics: dict) -> dict:
    by_prompt: dict[int, list[int]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt_index"], []).append(r["correct"])
    has_conf = any(r["confidence"] is not None for r in records)
    confidence = [r["confidence"] or 0.0 for r in records] if has_conf else None
    out = summarize(list(by_prompt.values()), [r["rewards"]["overall"] for r in records], confidence, ks)
    out.update(reward_metrics)
    return out


def run_eval(cfg: Any) -> Path:
    """Run the evaluation described by an `EvalConfig`; returns the output directory."""
    from mcore_r1.data import PromptDataset, load_processor, resolve_source

    _check_settings(cfg)
    cache_root = Path(cfg.cache_dir or default_cache_dir())
    model_dir = prepare_model_dir(cfg.model, cache_root, cfg.data)
    spec = resolve_source(cfg.data, cfg.split)
    dataset = PromptDataset(spec, cfg.data, load_processor(model_dir, cfg.data),
                            limit=cfg.max_prompts or None)
    key = cache_key({"model": model_fingerprint(model_dir), "dataset": dataset_fingerprint(dataset.items),
                     "settings": _settings(cfg)})
    out_dir = Path(cfg.output_dir)
    cached = cache_root / key
    if cfg.use_cache and (cached / "metrics.json").is_file():
        log.info("cache hit %s: copying results of an identical earlier run", cached)
        files = {name: (cached / name).read_text() for name in ("samples.jsonl", "metrics.json")}
    else:
        from mcore_r1.rewards import RewardManager

        # The reward is loaded and probed before generating, so a broken reward fails in seconds.
        with RewardManager(cfg.reward, max_response_length=cfg.rollout.max_new_tokens) as manager:
            records, reward_metrics = _score(cfg, manager, dataset, _generate(model_dir, cfg, dataset))
        metrics = _metrics(records, [int(k) for k in cfg.k], reward_metrics)
        metrics["run"] = {"model": str(model_dir), "data": spec, "split": cfg.split, "cache_key": key,
                          "dropped_overlong": dataset.stats.dropped_overlong,
                          "skipped_bad_rows": dataset.stats.skipped_bad, **_settings(cfg)["sampling"]}
        files = {"samples.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                 "metrics.json": json.dumps(metrics, indent=2, sort_keys=True) + "\n"}
        if cfg.use_cache:
            publish_dir(files, cached)
    for name in ("samples.jsonl", "metrics.json"):  # metrics.json last: it marks completion
        write_atomic(out_dir / name, files[name])
    log.info("wrote %s and %s", out_dir / "metrics.json", out_dir / "samples.jsonl")
    return out_dir
