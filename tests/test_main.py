"""The main job, as the README's Quickstart runs it (`python -m mcore_r1.main`), shortened to
two RL steps, on a fresh cache: it builds the tiny model and data, starts Ray with two hybrid
workers (Megatron TP=2 + colocated vLLM), trains, and writes finite metrics. Its final
checkpoint is then exported to Hugging Face format and generates with transformers and vLLM."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcore_r1.trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("reward/overall", "reward/accuracy", "actor/loss", "actor/grad_norm", "actor/clipfrac",
        "actor/entropy", "response/length_mean", "perf/tokens_per_s", "timing/rollout",
        "timing/update", "timing/refit", "val/accuracy", "mismatch/mismatch_abs_max")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("main")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_R1_")}
    env["MCORE_R1_CACHE"] = str(tmp_path / "cache")
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "mcore_r1.main", "trainer.total_steps=2", "trainer.val_every=1",
         "data.val_prompts=8", f"trainer.output_dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    return tmp_path, run_dir, out


def test_default_job_runs_end_to_end(default_run):
    tmp_path, run_dir, out = default_run
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0, log
    assert "layout: world 2 = DP 1 x TP 2 x PP 1 x CP 1" in out.stdout + out.stderr, log
    assert (tmp_path / "cache" / "tiny_models").is_dir()  # built on first use
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        for key in KEYS:
            assert math.isfinite(record[key]), (key, record[key])
        assert record["mismatch/mismatch_abs_max"] < 1e-3  # vLLM samples from the trained weights
    assert math.isfinite(records[0]["val/accuracy"])
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert "step 2/2 | reward" in out.stdout + out.stderr  # the console line


def test_final_checkpoint_exports_and_generates(default_run):
    """`mcore-to-hf` reads the run directory (its latest checkpoint, TP=2) as it is; the HF
    model, processor included, generates the same greedy tokens in transformers and vLLM, and
    carries the trained weights, not the initial ones."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from mcore_r1.config import compose, to_config
    from mcore_r1.data import PromptDataset, load_processor, resolve_source
    from mcore_r1.rollout.engine import build_llm
    from mcore_r1.trainer.rollout import vllm_request

    tmp_path, run_dir, out = default_run
    assert out.returncode == 0
    hf_dir = tmp_path / "exported"
    conv = subprocess.run([sys.executable, "tools/convert_hf_mcore.py", "mcore-to-hf", "--mcore",
                           str(run_dir), "--out", str(hf_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert conv.returncode == 0, conv.stdout[-2000:] + conv.stderr[-2000:]
    assert (hf_dir / "preprocessor_config.json").is_file()

    import json

    meta = json.loads((run_dir / "checkpoints" / "step_000002" / "mcore_r1_checkpoint.json").read_text())
    initial = load_file(str(Path(meta["source"]) / "model.safetensors"))  # the warm-started model
    exported = {k: v for f in hf_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert exported.keys() == initial.keys()
    assert any(not torch.equal(exported[k], initial[k]) for k in initial)  # it trained

    cfg = to_config(compose([]))
    processor = load_processor(hf_dir, cfg.data)
    items = PromptDataset(resolve_source(cfg.data, "test"), cfg.data, processor, limit=2).items
    hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf_tokens = []
    for item in items:
        inputs = processor(text=[item.prompt], images=list(item.images), return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == item.prompt_token_ids
        ids = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
        hf_tokens.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    from mcore_r1.data.images import pixel_limits
    from vllm import SamplingParams

    llm = build_llm(hf_dir, tp=1, seed=0, max_model_len=1024, enforce_eager=True, kv_cache_gib=0.5,
                    pixel_limits=pixel_limits(cfg.data.min_pixels, cfg.data.max_pixels),
                    max_images_per_prompt=1)
    outs = llm.generate([vllm_request(i) for i in items],
                        SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    vllm_tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert vllm_tokens == hf_tokens, (vllm_tokens, hf_tokens)
