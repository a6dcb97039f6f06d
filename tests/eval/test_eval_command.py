"""`python -m mcore_r1.eval`: end to end on the tiny VL model (vLLM on CPU), caching, bad input.

The end-to-end test runs the real command in a subprocess (vLLM stays out of the pytest
process) on the synthetic counting test split, then runs it again to hit the cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mcore_r1.config.schema import EvalConfig, ModelConfig
from mcore_r1.eval.runner import EvalError, _metrics, prepare_model_dir, run_eval
from mcore_r1.models.tiny import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {"MCORE_R1_CACHE": str(cache), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "mcore_r1.eval", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_eval_on_tiny_vl_model_writes_metrics_and_samples_then_hits_the_cache(tmp_path):
    model_dir = ensure_tiny_model("qwen2_5_vl")
    common = [f"model.path={model_dir}", "data.synthetic_train_size=4", "data.synthetic_test_size=3",
              "rollout.val_n=2", "rollout.val_temperature=1.0", "rollout.max_new_tokens=12", "k=[1,2]",
              "reward.function=confidence", "reward.kwargs={}", f"cache_dir={tmp_path / 'cache'}"]
    first = run_cli(common + [f"output_dir={tmp_path / 'out1'}"], tmp_path / "home")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]

    metrics = json.loads((tmp_path / "out1" / "metrics.json").read_text())
    samples = [json.loads(l) for l in (tmp_path / "out1" / "samples.jsonl").read_text().splitlines()]
    assert metrics["num_prompts"] == 3 and metrics["num_samples"] == 6 and len(samples) == 6
    assert [(s["prompt_index"], s["sample_index"]) for s in samples] == [(p, s) for p in range(3) for s in range(2)]
    # conf/data/synthetic_counting.yaml is the demo size (2 x 2 grid, 1-4 shapes, no distractors)
    data_dir = "counting-seed0-train4-test3-max4-distract0-grid2"
    rows = (tmp_path / "home" / "synthetic" / data_dir / "test.jsonl").read_text().splitlines()
    assert [s["answer"] for s in samples[::2]] == [json.loads(r)["answer"] for r in rows]
    assert all(s["response_length"] <= 12 and s["prompt"].count("<|image_pad|>") == 1 for s in samples)
    # The metrics are recomputed here from the per-sample records, independently of the runner.
    correct = [s["correct"] for s in samples]
    conf = [s["confidence"] for s in samples]
    assert metrics["accuracy"] == sum(correct) / 6
    assert metrics["mean_reward"] == pytest.approx(sum(s["rewards"]["overall"] for s in samples) / 6)
    assert metrics["brier"] == pytest.approx(sum((q - c) ** 2 for q, c in zip(conf, correct)) / 6)
    assert set(metrics["pass@k"]) == {"1", "2"} and 0.0 <= metrics["ece"] <= 1.0
    assert metrics["run"]["val_n"] == 2 and metrics["run"]["model"] == str(model_dir)

    again = run_cli(common + [f"output_dir={tmp_path / 'out2'}"], tmp_path / "home")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cache hit" in again.stdout + again.stderr
    assert "vllm" not in (again.stdout + again.stderr).lower()  # nothing was generated
    for name in ("metrics.json", "samples.jsonl"):
        assert (tmp_path / "out2" / name).read_bytes() == (tmp_path / "out1" / name).read_bytes()
    assert not [p for p in (tmp_path / "out2").iterdir() if p.name.startswith(".")]  # no temp files


def test_foreign_megatron_checkpoint_is_refused_with_advice(tmp_path):
    ckpt = tmp_path / "megatron"
    (ckpt / "iter_0000010").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("10")
    with pytest.raises(EvalError, match=r"Megatron checkpoint not written by mcore_r1.*Convert it"):
        prepare_model_dir(ModelConfig(path=str(ckpt)), tmp_path / "cache")
    with pytest.raises(EvalError, match="not a Hugging Face checkpoint"):
        prepare_model_dir(ModelConfig(path=str(tmp_path)), tmp_path / "cache")
    out = run_cli([f"model.path={ckpt}", f"output_dir={tmp_path / 'o'}"], tmp_path / "home", timeout=120)
    assert out.returncode == 2 and "not written by mcore_r1" in out.stderr


def test_mcore_r1_megatron_checkpoint_is_converted_once_and_cached(tmp_path):
    """HF -> Megatron with the converter tool, then the evaluator's Megatron -> HF step must give
    back the original tensors (compared against the untouched HF checkpoint)."""
    from safetensors.torch import load_file

    hf_dir = ensure_tiny_model("qwen2")
    mcore = tmp_path / "mcore"
    made = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_mcore.py"), "hf-to-mcore",
                           "--hf", str(hf_dir), "--out", str(mcore)], capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    converted = prepare_model_dir(ModelConfig(path=str(mcore)), tmp_path / "cache")
    assert converted.parent == tmp_path / "cache" / "converted_hf"
    original = load_file(hf_dir / "model.safetensors")
    back = {}
    for shard in converted.glob("*.safetensors"):
        back.update(load_file(shard))
    assert back.keys() == original.keys()
    assert all(back[k].equal(original[k]) for k in original)
    assert (converted / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    stamp = (converted / "config.json").stat().st_mtime_ns
    assert prepare_model_dir(ModelConfig(path=str(mcore)), tmp_path / "cache") == converted
    assert (converted / "config.json").stat().st_mtime_ns == stamp  # cached, not converted again


def test_k_larger_than_n_is_an_error():
    cfg = EvalConfig(k=[1, 4])
    cfg.rollout.val_n = 2
    with pytest.raises(EvalError, match=r"k <= rollout.val_n=2; k=\[1, 4\] has \[4\]"):
        run_eval(cfg)
    with pytest.raises(EvalError, match="split='validation' must be train or test"):
        run_eval(EvalConfig(split="validation"))


def test_metrics_from_records_with_and_without_confidence():
    def rec(p, correct, overall, conf):
        return {"prompt_index": p, "correct": correct, "rewards": {"overall": overall}, "confidence": conf}

    records = [rec(0, 1, 1.0, 0.9), rec(0, 0, 0.0, None), rec(1, 0, 0.5, 0.2), rec(1, 0, 0.5, 0.4)]
    out = _metrics(records, [1, 2], {"reward/overall": 0.5})
    # Missing confidence counts as 0: conf = [0.9, 0, 0.2, 0.4], correct = [1, 0, 0, 0].
    assert out["brier"] == pytest.approx((0.01 + 0 + 0.04 + 0.16) / 4)
    assert out["auroc"] == 1.0
    assert out["pass@k"] == {"1": pytest.approx(0.25), "2": pytest.approx(0.5)}
    plain = _metrics([rec(0, 1, 1.0, None), rec(0, 0, 0.0, None)], [1], {})
    assert plain["brier"] is None and plain["accuracy"] == 0.5
