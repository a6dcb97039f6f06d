"""Tests for the format-only warm-start (mcore_r1.models.warmstart).

The claim to check is two-sided: after the warm-start the tiny model writes the task's answer
format on prompts it never saw, *and* it has not learnt the answers (greedy accuracy stays near
what a constant guess scores), so any accuracy gain in an RL run is the RL's doing. One VL
warm-start (the default counting experiment) is built per module into a temporary directory.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from mcore_r1.data.dataset import PromptDataset, load_processor, resolve_source
from mcore_r1.models import tiny, warmstart
from mcore_r1.rewards.builtin import r1v_reward

STEPS = 120  # enough for the format (loss plateaus near log(6) / response length), ~20 s
HELD_OUT = 32


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    return warmstart.ensure_warm_model("qwen2_5_vl", "counting", root, steps=STEPS)


@pytest.fixture(scope="module")
def greedy(warm_dir):
    """Greedy responses of the warm model to held-out (test split) prompts, with references."""
    cfg = warmstart.task_data_config("counting")
    processor = load_processor(warm_dir, cfg)
    processor.tokenizer.padding_side = "left"
    items = PromptDataset(resolve_source(cfg, "test"), cfg, processor, limit=HELD_OUT).items
    model = warmstart.load_model(warm_dir).eval()
    enc = processor(text=[it.prompt for it in items], images=[im for it in items for im in it.images],
                    padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    texts = processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return list(zip(texts, [it.answer for it in items]))


def test_directory_layout_and_metadata(warm_dir):
    assert warm_dir.name == warmstart.warm_model_name("qwen2_5_vl", "counting")
    assert warm_dir.name.startswith("qwen2_5_vl-warm-counting-")
    assert tiny.is_complete(warm_dir)
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json", "warmstart.json"):
        assert (warm_dir / name).is_file(), name
    assert not list(warm_dir.parent.glob(".*tmp*")), "temporary build directory left behind"
    info = (warm_dir / "warmstart.json").read_text()
    assert '"steps": %d' % STEPS in info and '"answers": [' in info


def test_second_call_reuses_the_checkpoint(warm_dir):
    before = (warm_dir / "model.safetensors").stat().st_mtime_ns
    assert warmstart.ensure_warm_model("qwen2_5_vl", "counting", warm_dir.parent) == warm_dir
    assert (warm_dir / "model.safetensors").stat().st_mtime_ns == before


def test_format_is_learnt_on_held_out_prompts(greedy):
    valid = [r1v_reward({"response": text, "ground_truth": ref})["format"] for text, ref in greedy]
    assert sum(valid) / len(valid) >= 0.9, greedy[:4]
    answers = [re.search(r"<answer>(.*?)</answer>", t).group(1).strip() for t, _ in greedy if "<answer>" in t]
    assert set(answers) <= {str(k) for k in range(1, 7)}, answers


def test_answers_are_not_learnt(greedy):
    """Greedy accuracy is no better than always giving the most common reference answer."""
    accuracy = sum(r1v_reward({"response": t, "ground_truth": ref})["accuracy"] for t, ref in greedy)
    best_constant = Counter(ref for _, ref in greedy).most_common(1)[0][1]
    assert accuracy <= best_constant + 2, (accuracy, best_constant, greedy[:8])
    assert accuracy / len(greedy) <= 0.4


def test_targets_carry_no_answer_information():
    """The SFT targets draw K from the whole range; the reference answer is never used."""
    assert warmstart.answer_range("counting", ["3"]) == [1, 2, 3, 4, 5, 6]
    assert warmstart.answer_range("counting", ["3"], max_count=4) == [1, 2, 3, 4]
    assert warmstart.answer_range("arithmetic", ["4", "-2", "9"]) == list(range(-2, 10))
    fmt = warmstart.TASK_FORMAT["counting"][2].format(k=5)
    assert r1v_reward({"response": fmt, "ground_truth": "5"}) == {"overall": 1.0, "format": 1.0, "accuracy": 1.0}


def test_the_directory_name_follows_the_data_settings():
    """A changed task setting never reuses a warm model taught on other prompts."""
    from dataclasses import replace

    base = warmstart.task_data_config("counting")
    names = {warmstart.warm_model_name("qwen2_5_vl", "counting", cfg) for cfg in (
        base, replace(base, synthetic_grid=2), replace(base, format_prompt="math"),
        replace(base, max_pixels=3136 * 4))}
    assert len(names) == 4
    assert warmstart.warm_model_name("qwen2_5_vl", "counting", base) == \
        warmstart.warm_model_name("qwen2_5_vl", "counting", replace(base, train_files="x.jsonl"))


def test_deterministic_and_text_models_rejected_for_images(tmp_path):
    torch.set_num_threads(1)
    base = tiny.ensure_tiny_model("qwen2", tmp_path / "root")
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        warmstart.warm_start(base, out, "arithmetic", steps=3, log=None)
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match="VL model"):
        warmstart.ensure_warm_model("qwen2", "counting", tmp_path / "root")
