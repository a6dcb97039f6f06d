"""Shared fixtures: the tiny VL processor and a small set of equivalent records in both formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mcore_r1.config.schema import DataConfig
from mcore_r1.models.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def vl_dir() -> Path:
    return ensure_tiny_model("qwen2_5_vl")


@pytest.fixture(scope="session")
def processor(vl_dir):
    from mcore_r1.data import load_processor

    return load_processor(vl_dir, DataConfig())


def picture(color: str, size=(100, 80)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill=color)
    return image


# (question text with <image> tags, image names, answer): text-only, single and multi-image rows.
ROWS = [
    ("What is 2 + 3?", [], "5"),
    ("<image>How many red circles are in the image?", ["red.png"], "1"),
    ("Compare <image> and <image>: which has more?", ["red.png", "blue.png"], "neither"),
]


def lmm_message(question: str, images: list[str], image_values) -> str:
    """The LMM-R1 equivalent of an EasyR1 question: parts in the same order, as a JSON string."""
    parts, values = [], iter(image_values)
    for i, chunk in enumerate(question.split("<image>")):
        if i:
            parts.append({"type": "image", "image": next(values)})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return json.dumps([{"role": "user", "content": parts}])


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    picture("red").save(d / "red.png")
    picture("blue", (64, 120)).save(d / "blue.png")
    return d


def data_cfg(**overrides) -> DataConfig:
    return DataConfig(**overrides)
