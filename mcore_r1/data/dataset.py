"""The prompt dataset: rows -> examples -> chat-templated, tokenised prompts, checked at load time.

Loading does all checking up front, so nothing surprises the trainer mid-run:

1. rows are read from the source (`sources`), converted by the record format (`formats`),
   images decoded (`images`); a bad row raises a `DataError` naming file and row, or, with
   ``data.skip_bad_rows``, is counted and logged;
2. the prompt is built (format prompt, system prompt, chat template: `prompts`) and tokenised
   by the model's own processor, images included, with the image size limits of
   ``data.min_pixels``/``max_pixels`` (the same limits vLLM gets, see `images.pixel_limits`);
3. prompts longer than ``data.max_prompt_length`` are dropped and counted, never truncated:
   cutting a VLM prompt can cut through an image's tokens.

Items keep decoded images in memory; that suits the dataset sizes RL prompt sets have (10^3 to
10^5 rows of small images) and keeps `__getitem__` free of I/O errors.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from mcore_r1.data.errors import DataError
from mcore_r1.data.formats import Example, RecordKeys, to_example
from mcore_r1.data.images import apply_pixel_limits, pixel_limits
from mcore_r1.data.prompts import build_messages, count_image_parts, render_chat
from mcore_r1.data.sources import read_rows

log = logging.getLogger("mcore_r1.data")


@dataclass
class PromptItem:
    """One ready prompt: what the rollout engine and the trainer consume."""

    prompt: str                  # chat-templated text, generation prompt included
    prompt_token_ids: list[int]  # the processor's ids, image tokens expanded
    images: list[Image.Image]
    answer: str
    where: str                   # source file and row
    messages: list[dict] = field(repr=False, default_factory=list)


@dataclass
class LoadStats:
    rows: int = 0
    kept: int = 0
    dropped_overlong: int = 0
    skipped_bad: int = 0
    skip_reasons: Counter = field(default_factory=Counter)

    def summary(self, spec: str) -> str:
        text = (f"{spec}: {self.kept} of {self.rows} rows kept; {self.dropped_overlong} dropped "
                f"as longer than max_prompt_length; {self.skipped_bad} bad rows skipped")
        if self.skip_reasons:
            text += " (" + ", ".join(f"{n} x {r}" for r, n in self.skip_reasons.most_common()) + ")"
        return text


def is_multimodal_dir(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return (d / "preprocessor_config.json").is_file() or (d / "processor_config.json").is_file()


def load_processor(model_dir: str | Path, data_cfg: Any):
    """The model's processor (VL) or tokenizer (text), with this run's image size limits."""
    import transformers as tf

    if is_multimodal_dir(model_dir):
        processor = tf.AutoProcessor.from_pretrained(str(model_dir))
        apply_pixel_limits(processor, pixel_limits(data_cfg.min_pixels, data_cfg.max_pixels))
        return processor
    return tf.AutoTokenizer.from_pretrained(str(model_dir))


def tokenize_prompt(processor: Any, prompt: str, images: list[Image.Image]) -> list[int]:
    """Prompt ids exactly as the model will see them (each image expanded to its tokens)."""
    if images:
        if not hasattr(processor, "image_processor"):
            raise ValueError("the row has images but the model has no image processor (text-only model)")
        out = processor(text=[prompt], images=images)
        return list(out["input_ids"][0])
    tokenizer = getattr(processor, "tokenizer", processor)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def resolve_source(data_cfg: Any, split: str) -> str:
    """The data spec for `split` (train / test): the configured files or the synthetic cache."""
    from mcore_r1.data.synthetic import Difficulty, ensure_synthetic

    configured = data_cfg.train_files if split == "train" else data_cfg.val_files
    if configured:
        return configured
    if split != "train" and data_cfg.train_files:
        raise ValueError("data.val_files is empty but data.train_files is set: name the evaluation data")
    level = Difficulty(data_cfg.synthetic_max_count, data_cfg.synthetic_max_distractors,
                       data_cfg.synthetic_max_operand, data_cfg.synthetic_grid)
    root = ensure_synthetic(data_cfg.synthetic, data_cfg.synthetic_train_size,
                            data_cfg.synthetic_test_size, seed=data_cfg.synthetic_seed, level=level)
    return str(root / ("train.jsonl" if split == "train" else "test.jsonl"))


class PromptDataset:
    """A list of `PromptItem`s built from `spec` under `data_cfg`; see the module docstring."""

    def __init__(self, spec: str, data_cfg: Any, processor: Any, limit: Optional[int] = None):
        self.spec = spec
        self.cfg = data_cfg
        self.processor = processor
        self.stats = LoadStats()
        keys = RecordKeys(data_cfg.prompt_key, data_cfg.answer_key, data_cfg.image_key,
                          data_cfg.message_key)
        self.items: list[PromptItem] = []
        for raw in read_rows(spec):
            if limit is not None and len(self.items) >= limit:
                break
            self.stats.rows += 1
            try:
                item = self._build(raw, keys)
            except DataError as err:
                self._bad_row(err)
                continue
            if item is not None:
                self.items.append(item)
        self.stats.kept = len(self.items)
        # Dropped or skipped rows change what the run trains on: say so at warning level.
        lost = self.stats.dropped_overlong + self.stats.skipped_bad
        log.log(logging.WARNING if lost else logging.INFO, self.stats.summary(spec))
        if not self.items:
            raise ValueError(f"{spec}: no usable rows ({self.stats.summary(spec)})")

    def _base_dirs(self, raw_base: Optional[Path]) -> list[Path]:
        dirs = [Path(self.cfg.image_dir).expanduser()] if self.cfg.image_dir else []
        return dirs + ([raw_base] if raw_base is not None else [])

    def _build(self, raw, keys: RecordKeys) -> Optional[PromptItem]:
        if isinstance(raw.row, DataError):
            raise raw.row
        example: Example = to_example(self.cfg.format, raw.row, keys, raw.where,
                                      self._base_dirs(raw.base_dir))
        messages = build_messages(example, self.cfg.format_prompt, self.cfg.system_prompt)
        if count_image_parts(messages) != len(example.images):
            raise DataError(raw.where, f"format prompt {self.cfg.format_prompt!r} changed the number "
                                       f"of <image> placeholders ({count_image_parts(messages)} != "
                                       f"{len(example.images)}); keep {{{{ content }}}} once")
        prompt = render_chat(self.processor, messages)
        try:
            ids = tokenize_prompt(self.processor, prompt, example.images)
        except ValueError as err:
            raise DataError(raw.where, str(err)) from err
        if len(ids) > self.cfg.max_prompt_length:
            if not self.cfg.filter_overlong_prompts:
                raise DataError(raw.where, f"prompt has {len(ids)} tokens > data.max_prompt_length="
                                           f"{self.cfg.max_prompt_length}; raise the limit, lower "
                                           "data.max_pixels, or set data.filter_overlong_prompts=true "
                                           "(prompts are never truncated)")
            self.stats.dropped_overlong += 1
            log.debug("%s: dropped, %d prompt tokens > %d", raw.where, len(ids), self.cfg.max_prompt_length)
            return None
        return PromptItem(prompt, ids, example.images, example.answer, raw.where, messages)

    def _bad_row(self, err: DataError) -> None:
        if not self.cfg.skip_bad_rows:
            raise err
        self.stats.skipped_bad += 1
        self.stats.skip_reasons[_reason_kind(err.problem)] += 1
        log.warning("skipping bad row: %s", err)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]


def _reason_kind(problem: str) -> str:
    """A short category for the skip summary (the full message is logged per row)."""
    for kind in ("malformed JSON", "not found", "no answer", "tag(s)", "no prompt"):
        if kind in problem:
            return kind
    return "other"
