"""Tests for the offline tiny checkpoints (mcore_r1.models.tiny): build, load, generate.

All five models are built once per module into a temporary directory (~10 s). Each is then
loaded by transformers and by vLLM (CPU), and vLLM's per-token log-probabilities are checked
against transformers' on the same tokens: that catches weight-loading mistakes (untied or
mis-tied LM head, rope scaling, M-RoPE sections, vision merger) that "it generated 8 tokens"
alone would not. vLLM runs in one subprocess for all models, so its import (~12 s) is paid once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mcore_r1.models import tiny, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXT_NAMES = ("qwen2", "qwen3", "llama3")
VL_NAMES = ("qwen2_vl", "qwen2_5_vl")
NEW_TOKENS = 8
QUESTION = "How many red circles are in the image?"


def shape_image() -> Image.Image:
    """A 100x80 picture of coloured shapes, like the synthetic counting tasks use."""
    image = Image.new("RGB", (100, 80), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 40, 40), fill="red")
    draw.rectangle((55, 35, 90, 70), fill="blue")
    return image


def messages(name: str) -> list[dict]:
    if name in VL_NAMES:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return [{"role": "user", "content": "What is 12 + 7?"}]


def sha256_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_models")
    start = time.perf_counter()
    for name in tiny.TINY_MODEL_NAMES:
        assert tiny.build_tiny_model(name, root / name) == root / name
    print(f"\n[tiny] built all five models in {time.perf_counter() - start:.1f} s")
    return root


def load_hf(name: str, model_dir: Path):
    """(model, processor-or-tokenizer) through the Auto classes, as downstream code does."""
    import transformers as tf

    if name in VL_NAMES:
        return (tf.AutoModelForImageTextToText.from_pretrained(model_dir),
                tf.AutoProcessor.from_pretrained(model_dir))
    return tf.AutoModelForCausalLM.from_pretrained(model_dir), tf.AutoTokenizer.from_pretrained(model_dir)


def hf_inputs(name: str, processor) -> dict:
    text = processor.apply_chat_template(messages(name), add_generation_prompt=True, tokenize=False)
    if name in VL_NAMES:
        return processor(text=[text], images=[shape_image()], return_tensors="pt")
    return processor([text], return_tensors="pt", add_special_tokens=False)


# ----------------------------------------------------------------------------- configs / files


@pytest.mark.parametrize("name", tiny.TINY_MODEL_NAMES)
def test_config_and_tokenizer_agree(tiny_root, name):
    import transformers as tf

    model_dir = tiny_root / name
    config = tf.AutoConfig.from_pretrained(model_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    text = config.get_text_config()
    assert config.architectures == [tiny.TINY_ARCHITECTURES[name]]
    saved, spec = config.to_dict(), tiny.tiny_hf_config(name).to_dict()
    for volatile in ("_name_or_path", "transformers_version"):
        saved.pop(volatile, None), spec.pop(volatile, None)
    assert saved == spec  # the cheap config is exactly what the build writes
    # Padded vocabulary, as in real Qwen checkpoints.
    assert 1000 <= len(tokenizer) <= 2000
    assert len(tokenizer) < text.vocab_size == tiny.VOCAB_SIZE
    assert text.hidden_size // text.num_attention_heads == 64 == getattr(text, "head_dim", 64)
    assert (text.eos_token_id, text.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.convert_ids_to_tokens([text.eos_token_id, text.pad_token_id, text.bos_token_id]) == [
        "<|im_end|>", "<|endoftext|>", "<|endoftext|>"]
    if name in VL_NAMES:
        pairs = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
        for key, token in pairs.items():
            assert getattr(config, key) == tokenizer.convert_tokens_to_ids(token), key
        assert sum(text.rope_parameters["mrope_section"]) == 32
        assert (model_dir / "preprocessor_config.json").is_file()
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "chat_template.jinja"} <= files


def test_tied_embeddings_and_float32(tiny_root):
    from safetensors import safe_open

    expect_tied = {"qwen2": True, "qwen3": True, "llama3": False, "qwen2_vl": False, "qwen2_5_vl": True}
    for name, tied in expect_tied.items():
        with safe_open(tiny_root / name / "model.safetensors", "pt") as f:
            keys = set(f.keys())
            dtypes = {f.get_slice(k).get_dtype() for k in keys}
        assert ("lm_head.weight" not in keys) == tied, name
        assert dtypes == {"F32"}, name


def test_tokenizer_behaviour(tiny_root):
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_root / "qwen3")
    for token, token_id in tiny_tokenizer.SPECIAL_TOKEN_IDS.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    odd = "Ünïcødé ✓ 😀 \t tabs\r\nand 1234567 \\boxed{19} <answer>19</answer>"
    assert tokenizer.decode(tokenizer.encode(odd)) == odd  # byte-level: nothing is unknown
    assert tokenizer.tokenize("123") == ["1", "2", "3"]  # digits split one by one, as in Qwen
    assert tokenizer.tokenize(" circles") == ["Ġcircles"]  # task words are single tokens
    decoded = tokenizer.decode(tokenizer.encode("<think>x</think><|im_end|>"), skip_special_tokens=True)
    assert decoded == "<think>x</think>"  # think tags survive, im_end does not
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n")
    vl = tokenizer.apply_chat_template(messages("qwen2_vl"), tokenize=False)
    assert vl == f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"


def test_tokenizer_training_is_process_independent():
    """Another process, other hash seed and thread count: the same vocabulary and merges."""
    code = ("import hashlib, json; from mcore_r1.models.tiny_tokenizer import train_bpe; "
            "print(hashlib.sha256(json.dumps(train_bpe()).encode()).hexdigest())")
    env = dict(os.environ, RAYON_NUM_THREADS="2", PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    here = hashlib.sha256(json.dumps(tiny_tokenizer.train_bpe()).encode()).hexdigest()
    assert out.stdout.strip() == here


# ----------------------------------------------------------------------------- build mechanics


@pytest.mark.parametrize("name", ["qwen2", "qwen2_5_vl"])
def test_same_seed_is_byte_identical_other_seed_differs(tiny_root, tmp_path, name):
    tiny_tokenizer.train_bpe.cache_clear()  # really retrain, do not reuse the cached result
    again = sha256_tree(tiny.build_tiny_model(name, tmp_path / "again", seed=0))
    assert again == sha256_tree(tiny_root / name)
    other = sha256_tree(tiny.build_tiny_model(name, tmp_path / "other", seed=1))
    assert other.keys() == again.keys()
    differing = {f for f in again if again[f] != other[f]}
    assert differing == {"model.safetensors"}  # only the weights depend on the seed


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    # Weights are already written when the tokenizer step fails: a genuinely partial build.
    monkeypatch.setattr(tiny, "_save_tokenizer", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        tiny.build_tiny_model("qwen3", tmp_path / "qwen3")
    assert list(tmp_path.iterdir()) == []

    # Rebuilding over a good checkpoint: a failure keeps the old one intact.
    monkeypatch.undo()
    good = sha256_tree(tiny.build_tiny_model("qwen3", tmp_path / "qwen3"))
    monkeypatch.setattr(tiny, "_save_tokenizer", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        tiny.build_tiny_model("qwen3", tmp_path / "qwen3", seed=5)
    assert [p.name for p in tmp_path.iterdir()] == ["qwen3"]
    assert sha256_tree(tmp_path / "qwen3") == good


def test_ensure_builds_once_and_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MCORE_R1_CACHE", str(tmp_path / "cache"))
    assert tiny.default_tiny_root() == tmp_path / "cache" / "tiny_models"
    path = tiny.ensure_tiny_model("qwen3")
    assert path == tmp_path / "cache" / "tiny_models" / "qwen3"
    assert (path / "config.json").is_file()
    monkeypatch.setattr(tiny, "_write_checkpoint", lambda *a: pytest.fail("rebuilt an existing model"))
    assert tiny.ensure_tiny_model("qwen3") == path
    monkeypatch.delenv("MCORE_R1_CACHE")
    assert tiny.default_tiny_root() == Path.home() / ".cache" / "mcore_r1" / "tiny_models"


def test_ensure_refuses_to_clobber_a_foreign_directory(tmp_path):
    (tmp_path / "qwen3").mkdir()
    (tmp_path / "qwen3" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no config.json"):
        tiny.ensure_tiny_model("qwen3", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["qwen3"]  # no temp dir left behind
    assert [p.name for p in (tmp_path / "qwen3").iterdir()] == ["notes.txt"]


def test_unknown_name_lists_known_ones(tmp_path):
    for call in (lambda: tiny.tiny_hf_config("gpt2"), lambda: tiny.build_tiny_model("gpt2", tmp_path),
                 lambda: tiny.ensure_tiny_model("gpt2", tmp_path)):
        with pytest.raises(ValueError, match="qwen2, qwen3, llama3, qwen2_vl, qwen2_5_vl"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_cli_builds_then_keeps(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_models", REPO / "tools" / "make_tiny_models.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main(["--out", str(tmp_path), "--names", "llama3", "--seed", "3"])
    out = capsys.readouterr().out
    assert "llama3: built (seed 3)" in out and "model.safetensors" in out
    weights = tmp_path / "llama3" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    cli.main(["--out", str(tmp_path), "--names", "llama3"])
    assert "already present" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == before
    cli.main(["--out", str(tmp_path), "--names", "llama3", "--force"])
    assert "built (seed 0)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3"]


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", tiny.TINY_MODEL_NAMES)
def test_transformers_generate(tiny_root, name):
    model, processor = load_hf(name, tiny_root / name)
    assert type(model).__name__ == tiny.TINY_ARCHITECTURES[name]
    inputs = hf_inputs(name, processor)
    if name in VL_NAMES:
        merge = processor.image_processor.merge_size
        n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert n_image_tokens == int(inputs["image_grid_thw"].prod()) // merge**2 > 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
        logits = model(**inputs).logits
    assert out.shape[1] - inputs["input_ids"].shape[1] == NEW_TOKENS
    assert torch.isfinite(logits).all()


VLLM_SCRIPT = textwrap.dedent("""
    import gc, json, sys, time
    from PIL import Image
    from vllm import LLM, SamplingParams
    model_dirs, image_path, out_path, n_tokens = sys.argv[1:5]
    image = Image.open(image_path).convert("RGB")
    results = {}
    for name, path in json.loads(model_dirs).items():
        start = time.perf_counter()
        vl = name.endswith("_vl")
        llm = LLM(model=path, distributed_executor_backend="uni", max_model_len=1024,
                  dtype="float32", seed=0, enforce_eager=True,
                  limit_mm_per_prompt={"image": 1, "video": 0} if vl else None)
        content = [{"type": "image"}, {"type": "text", "text": "How many red circles are in the image?"}]
        messages = [{"role": "user", "content": content if vl else "What is 12 + 7?"}]
        prompt = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        request = {"prompt": prompt, "multi_modal_data": {"image": image}} if vl else prompt
        params = SamplingParams(max_tokens=int(n_tokens), temperature=0, ignore_eos=True, logprobs=0)
        out = llm.generate([request], params)[0]
        tokens = list(out.outputs[0].token_ids)
        results[name] = {
            "prompt": prompt, "prompt_token_ids": list(out.prompt_token_ids), "token_ids": tokens,
            "logprobs": [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)],
            "seconds": time.perf_counter() - start,
        }
        del llm
        gc.collect()
    with open(out_path, "w") as f:
        json.dump(results, f)
""")


@pytest.fixture(scope="module")
def vllm_results(tiny_root, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("vllm")
    shape_image().save(work / "image.png")
    dirs = {name: str(tiny_root / name) for name in tiny.TINY_MODEL_NAMES}
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, json.dumps(dirs), str(work / "image.png"),
         str(work / "out.json"), str(NEW_TOKENS)],
        env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"vLLM subprocess failed:\n{proc.stderr[-6000:]}"
    results = json.loads((work / "out.json").read_text())
    per_model = ", ".join(f"{n} {r['seconds']:.1f}s" for n, r in results.items())
    print(f"\n[tiny] vLLM part took {elapsed:.1f} s ({per_model})")
    return results


@pytest.mark.parametrize("name", tiny.TINY_MODEL_NAMES)
def test_vllm_generates_and_matches_transformers(tiny_root, vllm_results, name):
    result = vllm_results[name]
    assert len(result["token_ids"]) == NEW_TOKENS
    assert all(0 <= t < tiny.VOCAB_SIZE for t in result["token_ids"])
    model, processor = load_hf(name, tiny_root / name)
    inputs = hf_inputs(name, processor)
    # vLLM expanded the image placeholder exactly like the HF processor did.
    assert result["prompt_token_ids"] == inputs["input_ids"][0].tolist()
    # Teacher-force vLLM's tokens through transformers: same log-probabilities => same weights.
    # Observed agreement is ~1e-6; a mis-loaded tensor shifts them by ~0.1 (logit std ~0.3).
    generated = torch.tensor([result["token_ids"]])
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], generated], dim=1))
    # Per-token side inputs grow with the sequence: attended (1), and plain text (modality 0).
    for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0)):
        if key in inputs:
            full[key] = torch.cat([inputs[key], torch.full_like(generated, fill)], dim=1)
    with torch.no_grad():
        logits = model(**full).logits[0, -NEW_TOKENS - 1:-1]
    hf_logprobs = torch.log_softmax(logits.double(), dim=-1)[torch.arange(NEW_TOKENS), generated[0]]
    torch.testing.assert_close(hf_logprobs, torch.tensor(result["logprobs"], dtype=torch.float64),
                               atol=1e-4, rtol=0)
