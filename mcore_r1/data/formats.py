"""Record formats: EasyR1 rows and LMM-R1 message rows, both turned into one `Example`.

The canonical form is an OpenAI-style conversation whose user content is a list of parts,
``{"type": "image"}`` and ``{"type": "text", "text": ...}``, plus the list of images in the
order their parts appear, plus the reference answer. Two records that mean the same thing in the
two formats become equal `Example`s, hence identical model inputs.

* **easyr1**: ``{problem, answer, images}``. ``<image>`` tags in the text mark where each image
  goes; their count must equal the number of images (checked here, naming the row), because a
  mismatch silently breaks the image-token/feature pairing later. A row without tags but with
  images is also a mismatch: placing them is a guess we refuse to make.
* **lmm_r1**: ``{message, answer}`` where ``message`` is a JSON *string* (as LMM-R1 writes it)
  or a real list of ``{"role", "content"}`` messages; image parts carry the image itself
  (``"image": "file:///..."``, a path, bytes) or an ``image_url``.

Key names come from the data config (`RecordKeys`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from mcore_r1.data.errors import DataError
from mcore_r1.data.images import load_image

IMAGE_TAG = "<image>"
FORMATS = ("easyr1", "lmm_r1")


@dataclass(frozen=True)
class RecordKeys:
    prompt: str = "problem"
    answer: str = "answer"
    images: str = "images"
    message: str = "message"


@dataclass
class Example:
    messages: list[dict]      # OpenAI-style, user content as a list of image/text parts
    images: list[Image.Image]  # one per image part, in order
    answer: str
    where: str                # source location, for error messages and sample dumps
    extra: dict = field(default_factory=dict)


def to_example(fmt: str, row: dict, keys: RecordKeys, where: str, base_dirs: list[Path]) -> Example:
    if fmt == "easyr1":
        return _from_easyr1(row, keys, where, base_dirs)
    if fmt == "lmm_r1":
        return _from_lmm_r1(row, keys, where, base_dirs)
    raise ValueError(f"data.format={fmt!r} is unknown; known: {', '.join(FORMATS)}")


def _answer(row: dict, keys: RecordKeys, where: str) -> str:
    value = row.get(keys.answer)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(where, f"no answer (key {keys.answer!r} missing or empty; "
                               f"row keys: {sorted(row)})")
    return str(value).strip()


def text_to_parts(text: str) -> list[dict]:
    """Split text at ``<image>`` tags into image and (non-empty) text parts."""
    parts: list[dict] = []
    for i, chunk in enumerate(text.split(IMAGE_TAG)):
        if i > 0:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def _from_easyr1(row: dict, keys: RecordKeys, where: str, base_dirs: list[Path]) -> Example:
    prompt = row.get(keys.prompt)
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(where, f"no prompt text (key {keys.prompt!r}; row keys: {sorted(row)})")
    raw_images = row.get(keys.images)
    if raw_images is None:
        raw_images = []
    elif not isinstance(raw_images, (list, tuple)):
        raw_images = [raw_images]  # a single image column
    n_tags = prompt.count(IMAGE_TAG)
    if n_tags != len(raw_images):
        raise DataError(where, f"{n_tags} {IMAGE_TAG} tag(s) in {keys.prompt!r} but "
                               f"{len(raw_images)} image(s) in {keys.images!r}")
    images = [load_image(v, base_dirs, f"{where} image {i}") for i, v in enumerate(raw_images)]
    messages = [{"role": "user", "content": text_to_parts(prompt)}]
    return Example(messages, images, _answer(row, keys, where), where)


def _from_lmm_r1(row: dict, keys: RecordKeys, where: str, base_dirs: list[Path]) -> Example:
    raw = row.get(keys.message)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(where, f"{keys.message!r} is not valid JSON ({err.msg})") from err
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise DataError(where, f"{keys.message!r} must be a non-empty list of messages")
    messages, images = [], []
    for m, message in enumerate(raw):
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(where, f"message {m} is not a {{role, content}} object")
        parts = _content_parts(message.get("content"), where, m)
        for p, part in enumerate(parts):
            if part["type"] == "image":
                images.append(load_image(part.pop("source"), base_dirs, f"{where} message {m} part {p}"))
        messages.append({"role": message["role"], "content": parts})
    return Example(messages, images, _answer(row, keys, where), where)


def _content_parts(content: Any, where: str, m: int) -> list[dict]:
    """Normalise one message's content; image parts keep their image under "source"."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise DataError(where, f"message {m} content must be a string or a list of parts")
    parts = []
    for p, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind in ("image", "image_url"):
            source = part.get("image")
            if source is None and kind == "image_url":
                url = part.get("image_url")
                source = url.get("url") if isinstance(url, dict) else url
            if source is None:
                raise DataError(where, f"message {m} part {p}: image part without an image")
            parts.append({"type": "image", "source": source})
        else:
            raise DataError(where, f"message {m} part {p}: unsupported part type {kind!r}")
    return parts


def flatten_user_text(parts: list[dict]) -> str:
    """User content as text with ``<image>`` placeholders (used to apply a format prompt)."""
    return "".join(IMAGE_TAG if p["type"] == "image" else p["text"] for p in parts)


def last_user_index(messages: list[dict]) -> Optional[int]:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            return i
    return None
