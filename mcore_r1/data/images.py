"""Image loading and the one place where image size limits are decided.

Datasets give images in three shapes: a path (absolute, ``file://`` URL, or relative to the
dataset file or to ``data.image_dir``), raw bytes (also the ``{"bytes": ..., "path": ...}``
dicts that parquet files written by `datasets` carry), or a ready PIL image (what
``load_from_disk`` returns for an ``Image`` feature). All become RGB PIL images here.

Size limits: Qwen-VL processors resize every image so its area lies in
``[min_pixels, max_pixels]``; the number of image tokens follows from the resized size. If the
trainer's processor and vLLM's processor used different limits, the same prompt would expand to
different token counts (the "image features and image tokens do not match" failure users
report). So both read the limits from `pixel_limits` below, fed by the single pair of fields
``data.min_pixels`` / ``data.max_pixels``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from mcore_r1.data.errors import DataError


def load_image(value: Any, base_dirs: list[Path], where: str) -> Image.Image:
    """Turn one dataset image value into an RGB PIL image; errors name the row (`where`)."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return _from_bytes(value["bytes"], where)
        if value.get("path"):
            return _from_path(str(value["path"]), base_dirs, where)
        if value.get("image") is not None:  # OpenAI-style part {"type": "image", "image": ...}
            return load_image(value["image"], base_dirs, where)
        raise DataError(where, f"image entry has neither bytes nor path: keys {sorted(value)}")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(value), where)
    if isinstance(value, (str, Path)):
        return _from_path(str(value), base_dirs, where)
    raise DataError(where, f"unsupported image value of type {type(value).__name__}")


def _from_bytes(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception as err:  # PIL raises several types for corrupt data
        raise DataError(where, f"image bytes cannot be decoded ({err})") from err


def resolve_image_path(text: str, base_dirs: list[Path]) -> Optional[Path]:
    """The first existing file for `text`: absolute, or relative to each base directory."""
    if text.startswith("file://"):
        text = text[len("file://"):]
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [d / path for d in base_dirs] + [path]
    return next((c for c in candidates if c.is_file()), None)


def _from_path(text: str, base_dirs: list[Path], where: str) -> Image.Image:
    path = resolve_image_path(text, base_dirs)
    if path is None:
        looked = ", ".join(str(d) for d in base_dirs) or "the working directory"
        raise DataError(where, f"image file {text!r} not found (looked in {looked})")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as err:
        raise DataError(where, f"image file {path} cannot be read ({err})") from err


def pixel_limits(min_pixels: int, max_pixels: int) -> dict[str, int]:
    """Processor keyword arguments for the image area bounds; used by training and by vLLM."""
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels ({min_pixels}) <= max_pixels ({max_pixels})")
    return {"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)}


def processor_size(limits: dict[str, int]) -> dict[str, dict[str, int]]:
    """`limits` in the processor's own terms (transformers 5 / vLLM: the ``size`` dict)."""
    return {"size": {"shortest_edge": limits["min_pixels"], "longest_edge": limits["max_pixels"]}}


def apply_pixel_limits(processor: Any, limits: dict[str, int]) -> None:
    """Set the HF image processor's bounds to `limits` (the trainer's side of the contract)."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return
    image_processor.size = processor_size(limits)["size"]
    for key in ("min_pixels", "max_pixels"):
        if hasattr(image_processor, key):
            setattr(image_processor, key, limits[key])
