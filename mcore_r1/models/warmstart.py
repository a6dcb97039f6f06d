"""Supervised warm-start of a tiny model: teach the answer *format* of a synthetic task, not answers.

Why: the tiny models (``tiny.py``) are random-initialised. A random policy essentially never
emits ``<think>...</think> <answer>K</answer>`` on its own, so GRPO would spend the whole CPU
budget discovering the format and the demo run would show no accuracy gain. A short SFT phase
fixes the format so RL only has to learn the *answer*, which is what the demo should show.

What it does NOT teach: every target response is

    counting    ``<think> I count the shapes. </think> <answer>K</answer>``
    arithmetic  ``<think> I work it out. </think> \\boxed{K}``

with K drawn uniformly at random from the task's answer range, independently of the prompt and
image (its own seeded stream). The best the model can do on this data is to predict the uniform
marginal over K, so greedy accuracy after warm-start stays near chance, and sampling at
temperature 1 explores every answer evenly: exactly the diverse groups GRPO needs.

Details, each for a reason:

* prompts are the train split's, built by `PromptDataset` with the experiment's data settings
  (format prompt, difficulty, pixel bounds), so the model is trained on byte-identical prompt
  text and the answer range is the experiment's (counting: 1..max_count). The checkpoint's
  directory name carries a hash of those settings, so a changed setting never reuses a stale
  warm model;
* loss on response tokens (and the closing ``<|im_end|>``, so it learns to stop) only;
* the vision tower is frozen: the format does not depend on the picture, and freezing keeps the
  warm-start from shaping visual features in any way;
* the fixed reasoning is short (~15 tokens) because CPU rollouts are the bottleneck of RL;
* deterministic: seeded torch and ``random.Random``, single-threaded use is the caller's choice;
  the result is written to a temporary sibling directory and renamed into place (as ``tiny.py``).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from mcore_r1.models import tiny

TASKS = ("counting", "arithmetic")
# Per task: format prompt (as in conf/data/synthetic_*.yaml), prompt length limit, target response.
TASK_FORMAT = {
    "counting": ("r1v", 256, "<think> I count the shapes. </think> <answer>{k}</answer>"),
    "arithmetic": ("math", 128, "<think> I work it out. </think> \\boxed{{{k}}}"),
}
DEFAULT_STEPS = 150
DEFAULT_BATCH = 8
DEFAULT_LR = 1e-3
WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors")


def task_data_config(task: str, **overrides):
    """The `DataConfig` of the shipped synthetic experiment for `task` (plus overrides)."""
    from mcore_r1.config.schema import DataConfig

    fmt, max_len, _ = TASK_FORMAT[_check_task(task)]
    return replace(DataConfig(synthetic=task, format_prompt=fmt, max_prompt_length=max_len), **overrides)


def answer_range(task: str, answers: list[str], max_count: Optional[int] = None) -> list[int]:
    """Every answer K may take: 1..max_count for counting, else min..max of the train answers."""
    if task == "counting":
        from mcore_r1.data.synthetic import MAX_TARGETS

        return list(range(1, (max_count or MAX_TARGETS) + 1))
    values = [int(a) for a in answers]
    return list(range(min(values), max(values) + 1))


# The data settings that change what the warm-start trains on (and so its result).
_DATA_KEYS = ("synthetic", "synthetic_train_size", "synthetic_seed", "synthetic_max_count",
              "synthetic_max_distractors", "synthetic_max_operand", "synthetic_grid", "format",
              "format_prompt", "system_prompt", "max_prompt_length", "min_pixels", "max_pixels")


def warm_data_config(task: str, data_cfg: Any = None):
    """The experiment's data settings for the synthetic `task` (shipped defaults without one)."""
    if data_cfg is None:
        return task_data_config(task)
    return replace(data_cfg, train_files="", val_files="", synthetic=_check_task(task))


def warm_model_name(tiny_name: str, task: str, data_cfg: Any = None) -> str:
    """`<tiny>-warm-<task>-<hash of the data settings>`: one directory per distinct recipe."""
    cfg = warm_data_config(task, data_cfg)
    settings = json.dumps({k: getattr(cfg, k) for k in _DATA_KEYS}, sort_keys=True)
    return f"{tiny_name}-warm-{task}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"


def supports(tiny_name: str, task: str) -> bool:
    """Counting prompts carry images, so only the VL tiny models can be warm-started on them."""
    return _check_task(task) != "counting" or tiny_name in tiny.VL_MODEL_NAMES


def ensure_warm_model(tiny_name: str, task: str, root: Optional[str | Path] = None, seed: int = 0,
                      steps: int = DEFAULT_STEPS, data_cfg: Any = None) -> Path:
    """Return ``root/<warm_model_name>``, building it (base model + SFT) on first use."""
    root = Path(root if root is not None else tiny.default_tiny_root()).expanduser().absolute()
    out_dir = root / warm_model_name(tiny_name, _check_task(task), data_cfg)
    if tiny.is_complete(out_dir):
        return out_dir
    if not supports(tiny_name, task):
        raise ValueError(f"tiny model {tiny_name!r} cannot read {task!r} prompts (images need a VL model)")
    base = tiny.ensure_tiny_model(tiny_name, root)
    tmp = tiny._sibling(out_dir, "tmp")
    try:
        warm_start(base, tmp, task, seed=seed, steps=steps, data_cfg=warm_data_config(task, data_cfg))
        tiny._match_umask(tmp)
        tiny._publish(tmp, out_dir, replace=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return out_dir


def warm_start(base_dir: str | Path, out_dir: str | Path, task: str, *, seed: int = 0,
               steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR,
               data_cfg: Any = None, log=print) -> dict:
    """SFT `base_dir` on format-only targets and save the result into (existing) `out_dir`."""
    import torch

    from mcore_r1.data.dataset import PromptDataset, load_processor, resolve_source

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    data_cfg = data_cfg if data_cfg is not None else task_data_config(task)
    processor = load_processor(base_dir, data_cfg)
    items = PromptDataset(resolve_source(data_cfg, "train"), data_cfg, processor).items
    ks = answer_range(task, [it.answer for it in items], getattr(data_cfg, "synthetic_max_count", None))
    template = TASK_FORMAT[_check_task(task)][2]
    rng = random.Random(f"mcore_r1-warmstart-{task}-{seed}")  # answers and order: own stream
    torch.manual_seed(seed)
    model = load_model(base_dir)
    model.train()
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is not None:
        visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    order: list[int] = []
    losses = []
    for step in range(steps):
        batch = []
        for _ in range(batch_size):
            if not order:  # epochs over the prompts, reshuffled each time
                order = list(range(len(items)))
                rng.shuffle(order)
            batch.append((items[order.pop()], template.format(k=rng.choice(ks))))
        loss = sft_loss(model, processor, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % 25 == 0 or step == steps - 1):
            log(f"warm-start {task} step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()
    model.save_pretrained(out_dir)
    for path in base_dir.iterdir():  # tokenizer / processor / chat-template files, unchanged
        if path.is_file() and path.name not in WEIGHT_FILES:
            shutil.copy2(path, out_dir / path.name)
    info = {"base": base_dir.name, "task": task, "seed": seed, "steps": steps, "batch_size": batch_size,
            "lr": lr, "answers": ks, "response_template": template,
            "data": {k: getattr(data_cfg, k) for k in _DATA_KEYS},
            "final_loss": sum(losses[-10:]) / len(losses[-10:])}
    (out_dir / "warmstart.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def load_model(model_dir: str | Path):
    """The HF model class the directory's config names (VL or causal LM), float32 on CPU."""
    import torch
    import transformers as tf

    from mcore_r1.data.dataset import is_multimodal_dir

    cls = tf.AutoModelForImageTextToText if is_multimodal_dir(model_dir) else tf.AutoModelForCausalLM
    return cls.from_pretrained(str(model_dir), dtype=torch.float32)


def sft_loss(model, processor, batch: list[tuple[Any, str]]):
    """Token-mean cross-entropy over response tokens; prompt and padding are masked out."""
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    texts = [item.prompt + response + tokenizer.eos_token for item, response in batch]
    images = [im for item, _ in batch for im in item.images]
    if images:
        enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    else:
        enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    if tokenizer.padding_side != "right":
        raise RuntimeError("warm-start expects right padding (prompt ids at the start of each row)")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for row, (item, _) in enumerate(batch):
        n = len(item.prompt_token_ids)
        # The prompt ends at "assistant\n" and the response starts with an added token, so the
        # joint tokenisation must begin with exactly the prompt's ids; check rather than trust.
        if enc["input_ids"][row, :n].tolist() != list(item.prompt_token_ids):
            raise RuntimeError(f"{item.where}: prompt ids change when the response is appended")
        labels[row, :n] = -100
    out = model(**enc)
    logits = out.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"no warm-start recipe for task {task!r}; known: {', '.join(TASKS)}")
    return task
