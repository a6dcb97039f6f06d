"""Offline builder for tiny, randomly initialised Hugging Face checkpoints.

Why: tests and smoke runs need real checkpoints of every supported architecture (Qwen2, Qwen3,
Llama 3, Qwen2-VL, Qwen2.5-VL) that load in transformers, vLLM and our Megatron converters, yet
this machine has no network and two CPU cores. So we synthesise them: the real config classes
with every size scaled down, weights drawn by the real HF model classes, and a small tokenizer
trained on the spot (``tiny_tokenizer``). Nothing is downloaded.

What is scaled down, and what is not:

* text: 4 layers, hidden 256, 4 query / 2 KV heads (GQA stays exercised), MLP 512, vocab 2048.
  ``head_dim`` is 64 because vLLM's CPU attention backend rejects smaller heads (e.g. 16);
* vision: 2 blocks of width 128 with 2 heads (head_dim 64 again), the real patch 14, temporal
  patch 2 and 2x2 merge; the image processor caps images at 224x224 so a picture is <= 64 tokens;
* kept as in the real models: architecture quirks (Qwen2 QKV bias, Qwen3 q/k norm, Llama 3 rope
  scaling, M-RoPE with sections summing to head_dim/2, Qwen2.5-VL windowed attention with one
  full-attention block), tied vs untied embeddings, float32 weights, and a vocabulary *padded*
  beyond the tokenizer (2048 > len(tokenizer)), as real Qwen checkpoints do, so code that
  confuses the two sizes fails here too.

Special token ids are fixed constants (``tiny_tokenizer.SPECIAL_TOKEN_IDS``), which is why
``tiny_hf_config`` is cheap; ``build_tiny_model`` asserts the trained tokenizer agrees.

Determinism: same name + seed => byte-identical files. The tokenizer is trained from a seeded
corpus, weights are drawn after ``torch.manual_seed(seed)``, and transformers writes JSON with
sorted keys and safetensors with fixed metadata. Builds go to a temporary sibling directory that
is renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from mcore_r1.models import tiny_tokenizer as tt

TINY_MODEL_NAMES = ("qwen2", "qwen3", "llama3", "qwen2_vl", "qwen2_5_vl")
TINY_ARCHITECTURES: dict[str, str] = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama3": "LlamaForCausalLM",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
VL_MODEL_NAMES = ("qwen2_vl", "qwen2_5_vl")

VOCAB_SIZE = 2048  # padded: deliberately larger than (and != to) the tokenizer's length
ENDOFTEXT_ID = tt.SPECIAL_TOKEN_IDS["<|endoftext|>"]
IM_END_ID = tt.SPECIAL_TOKEN_IDS["<|im_end|>"]
BOS_TOKEN_ID = ENDOFTEXT_ID  # as in Qwen configs; the tokenizer itself prepends no BOS
EOS_TOKEN_ID = IM_END_ID
PAD_TOKEN_ID = ENDOFTEXT_ID
VISION_TOKEN_IDS = {
    "image_token_id": tt.SPECIAL_TOKEN_IDS["<|image_pad|>"],
    "video_token_id": tt.SPECIAL_TOKEN_IDS["<|video_pad|>"],
    "vision_start_token_id": tt.SPECIAL_TOKEN_IDS["<|vision_start|>"],
    "vision_end_token_id": tt.SPECIAL_TOKEN_IDS["<|vision_end|>"],
}

TEXT_SHAPE = dict(
    vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    rms_norm_eps=1e-6, initializer_range=0.02, hidden_act="silu",
    bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID,
)
# vLLM's CPU attention accepts head sizes 32, 64, 80, ..., 512 only (not 16).
HEAD_DIM = 64
assert TEXT_SHAPE["hidden_size"] // TEXT_SHAPE["num_attention_heads"] == HEAD_DIM
# M-RoPE splits the rotary half-dimension (32) between temporal, height and width positions.
MROPE_SECTION = [8, 12, 12]
assert sum(MROPE_SECTION) == HEAD_DIM // 2
# Qwen configs carry sliding-window fields even with the window off; match real checkpoints.
QWEN_WINDOW = dict(use_sliding_window=False, max_window_layers=TEXT_SHAPE["num_hidden_layers"])

# Image processor limits: 56x56 .. 224x224 pixels, i.e. 4 .. 64 merged vision tokens per image.
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 224 * 224
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2


def _check_name(name: str) -> str:
    if name not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODEL_NAMES)}")
    return name


def _mrope() -> dict:
    return {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(MROPE_SECTION)}


def tiny_hf_config(name: str):
    """The HF config of tiny model ``name``; cheap (no files, no training) and fully shaped."""
    import transformers as tf

    _check_name(name)
    common = dict(TEXT_SHAPE, dtype="float32", architectures=[TINY_ARCHITECTURES[name]])
    if name == "qwen2":
        return tf.Qwen2Config(**common, **QWEN_WINDOW, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if name == "qwen3":
        return tf.Qwen3Config(**common, **QWEN_WINDOW, head_dim=HEAD_DIM, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if name == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024}
        return tf.LlamaConfig(**common, head_dim=HEAD_DIM, rope_parameters=rope,
                              tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    return _vl_config(name, common)


def _vl_config(name: str, common: dict):
    """Qwen2-VL / Qwen2.5-VL: language numbers live in ``text_config`` (transformers 5)."""
    import transformers as tf

    architectures = common.pop("architectures")
    text = dict(common, **QWEN_WINDOW, rope_parameters=_mrope())
    vision_common = dict(depth=2, num_heads=2, patch_size=PATCH_SIZE, in_channels=3,
                         spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
                         initializer_range=0.02)
    if name == "qwen2_vl":
        vision = dict(vision_common, embed_dim=128, mlp_ratio=2, hidden_size=256)
        config_cls, tie = tf.Qwen2VLConfig, False
    else:
        vision = dict(vision_common, hidden_size=128, intermediate_size=256, out_hidden_size=256,
                      window_size=112, fullatt_block_indexes=[1])
        config_cls, tie = tf.Qwen2_5_VLConfig, True
    return config_cls(text_config=text, vision_config=vision, tie_word_embeddings=tie,
                      architectures=architectures, dtype="float32", **VISION_TOKEN_IDS)


def default_tiny_root() -> Path:
    """``$MCORE_R1_CACHE/tiny_models`` if set, else ``~/.cache/mcore_r1/tiny_models``."""
    cache = os.environ.get("MCORE_R1_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "mcore_r1"
    return base / "tiny_models"


def is_complete(model_dir: Path) -> bool:
    """A published checkpoint always has config.json (directories only appear by rename)."""
    return (Path(model_dir) / "config.json").is_file()


def ensure_tiny_model(name: str, root: str | Path | None = None) -> Path:
    """Return ``root/name``, building it (seed 0) if it is not there yet."""
    out_dir = Path(root if root is not None else default_tiny_root()) / _check_name(name)
    if not is_complete(out_dir):
        _build(name, out_dir, seed=0, replace=False)
    return out_dir


def build_tiny_model(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build tiny model ``name`` into ``out_dir`` (replacing what is there) and return the path."""
    return _build(_check_name(name), Path(out_dir), seed=seed, replace=True)


def build_tiny_models(root: str | Path, names=TINY_MODEL_NAMES, seed: int = 0,
                      force: bool = False) -> dict[str, tuple[Path, bool]]:
    """Build several models under ``root``; returns name -> (path, built_now). For the CLI."""
    for name in names:
        _check_name(name)  # fail before building anything
    done = {}
    for name in names:
        out_dir = Path(root) / name
        if force or not is_complete(out_dir):
            done[name] = (build_tiny_model(name, out_dir, seed=seed), True)
        else:
            done[name] = (out_dir, False)
    return done


def _build(name: str, out_dir: Path, seed: int, replace: bool) -> Path:
    out_dir = out_dir.expanduser().absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp")
    try:
        _write_checkpoint(name, tmp, seed)
        _match_umask(tmp)
        _publish(tmp, out_dir, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return out_dir


def _sibling(out_dir: Path, kind: str) -> Path:
    """A fresh hidden directory next to ``out_dir`` (same filesystem, so renames are atomic).

    ``os.mkdir`` rather than ``tempfile.mkdtemp``: it honours the umask, so the published
    directory gets ordinary permissions instead of mkdtemp's 0700.
    """
    path = out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def _match_umask(model_dir: Path) -> None:
    """Give every file the mode a plain ``open()`` would (some writers create them 0600)."""
    file_mode = model_dir.stat().st_mode & 0o666
    for path in model_dir.rglob("*"):
        if path.is_file():
            path.chmod(file_mode)


def _publish(tmp: Path, out_dir: Path, replace: bool) -> None:
    """Move the finished build into place with renames only (atomic on one filesystem)."""
    if replace and out_dir.exists():
        old = _sibling(out_dir, "old")
        os.replace(out_dir, old / "model")
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old / "model", out_dir)  # put the previous checkpoint back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out_dir)  # succeeds over a missing or empty directory only
    except OSError as err:
        # Lost a race with a concurrent ensure_tiny_model: the other build is just as good.
        if not is_complete(out_dir):
            raise FileExistsError(f"{out_dir} exists but is not a tiny checkpoint (no config.json);"
                                  " remove it or rebuild with build_tiny_model") from err


def _write_checkpoint(name: str, model_dir: Path, seed: int) -> None:
    config = tiny_hf_config(name)
    tokenizer = tt.build_tiny_tokenizer()
    check_consistency(config, tokenizer)
    _save_weights(name, config, model_dir, seed)
    _save_tokenizer(name, tokenizer, model_dir)


def check_consistency(config, tokenizer) -> None:
    """The config's vocabulary and special token ids must agree with the tokenizer."""
    text = config.get_text_config()
    problems = []
    if not len(tokenizer) <= text.vocab_size != len(tokenizer):
        problems.append(f"vocab_size {text.vocab_size} must exceed len(tokenizer) {len(tokenizer)}")
    expected = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    for key, want in expected.items():
        if getattr(text, key) != want:
            problems.append(f"{key}: config {getattr(text, key)} != tokenizer {want}")
    for key, token_id in VISION_TOKEN_IDS.items():
        if hasattr(config, key) and getattr(config, key) != token_id:
            problems.append(f"{key}: config {getattr(config, key)} != tokenizer {token_id}")
    if problems:
        raise RuntimeError("tiny model config/tokenizer mismatch: " + "; ".join(problems))


def _save_weights(name: str, config, model_dir: Path, seed: int) -> None:
    import torch
    import transformers as tf

    model_cls = getattr(tf, TINY_ARCHITECTURES[name])
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    for pname, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise RuntimeError(f"tiny model {name}: non-finite initial weights in {pname}")
    model.generation_config = tf.GenerationConfig(
        bos_token_id=BOS_TOKEN_ID, eos_token_id=[EOS_TOKEN_ID, ENDOFTEXT_ID],
        pad_token_id=PAD_TOKEN_ID,
    )
    model.save_pretrained(model_dir)


def _save_tokenizer(name: str, tokenizer, model_dir: Path) -> None:
    if name not in VL_MODEL_NAMES:
        tokenizer.save_pretrained(model_dir)
        return
    processor = build_processor(name, tokenizer)
    processor.save_pretrained(model_dir)  # tokenizer files, chat template, processor_config.json
    # transformers 5 keeps the image processor inside processor_config.json; published Qwen-VL
    # checkpoints (and tools that sniff for VL models) have it as preprocessor_config.json.
    processor.image_processor.save_pretrained(model_dir)


def build_processor(name: str, tokenizer):
    """Qwen2-VL style processor: image + video processors around the shared tokenizer."""
    import transformers as tf
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    sizes = dict(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
                 temporal_patch_size=TEMPORAL_PATCH_SIZE,
                 image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    image_processor = tf.Qwen2VLImageProcessor(
        min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, **sizes)
    # transformers 5 requires a video processor to build the processor; keep frames as small.
    video_processor = tf.Qwen2VLVideoProcessor(
        min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, **sizes)
    processor_cls = tf.Qwen2VLProcessor if name == "qwen2_vl" else tf.Qwen2_5_VLProcessor
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                         video_processor=video_processor, chat_template=tt.CHAT_TEMPLATE)


def describe_checkpoint(model_dir: str | Path) -> str:
    """One line per file with its size: what a build wrote (used by the CLI)."""
    model_dir = Path(model_dir)
    lines = [str(model_dir)]
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        lines.append(f"  {path.relative_to(model_dir)}  {path.stat().st_size:,} bytes")
    return "\n".join(lines)
