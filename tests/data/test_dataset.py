"""Loading: each format from each kind of source gives the model inputs of a hand-written prompt.

The reference for every row is the chat text written out by hand below, tokenised by the HF
processor directly (not by our pipeline), with the PNG files opened directly.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mcore_r1.data import DataError, PromptDataset
from tests.data.conftest import ROWS, data_cfg, lmm_message

VS = "<|vision_start|><|image_pad|><|vision_end|>"
EXPECTED_TEXT = [
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
    f"<|im_start|>user\n{VS}How many red circles are in the image?<|im_end|>\n<|im_start|>assistant\n",
    f"<|im_start|>user\nCompare {VS} and {VS}: which has more?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture()
def expected(processor, image_dir):
    out = []
    for text, (_, names, answer) in zip(EXPECTED_TEXT, ROWS):
        images = [Image.open(image_dir / n).convert("RGB") for n in names]
        ids = processor(text=[text], images=images or None)["input_ids"][0]
        out.append((text, list(ids), images, answer))
    return out


def _image_values(kind: str, names: list[str], image_dir):
    if kind == "path":
        return [f"imgs/{n}" for n in names]  # relative to the dataset file
    if kind == "url":
        return [f"file://{image_dir / n}" for n in names]
    if kind == "bytes":
        return [{"bytes": (image_dir / n).read_bytes(), "path": None} for n in names]
    raise ValueError(kind)


def _records(fmt: str, image_kind: str, image_dir, message_as_string=True) -> list[dict]:
    rows = []
    for question, names, answer in ROWS:
        values = _image_values(image_kind, names, image_dir)
        if fmt == "easyr1":
            rows.append({"problem": question, "images": values, "answer": answer})
        else:
            message = lmm_message(question, names, values)
            rows.append({"message": message if message_as_string else json.loads(message),
                         "answer": answer})
    return rows


def _write_source(kind: str, fmt: str, tmp_path, image_dir) -> str:
    if kind == "jsonl":
        path = tmp_path / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _records(fmt, "path", image_dir)))
    elif kind == "json":  # LMM-R1 messages as real lists here, image parts as file:// URLs
        path = tmp_path / "train.json"
        path.write_text(json.dumps(_records(fmt, "url", image_dir, message_as_string=False)))
    elif kind == "parquet":
        path = tmp_path / "train.parquet"
        pq.write_table(pa.Table.from_pylist(_records(fmt, "bytes" if fmt == "easyr1" else "path",
                                                     image_dir)), path)
    elif kind == "folder":  # two shards, read in sorted order
        path = tmp_path / "shards"
        path.mkdir()
        rows = _records(fmt, "url", image_dir)
        (path / "part-0.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n")
        (path / "part-1.jsonl").write_text(json.dumps(rows[2]) + "\n")
    elif kind == "save_to_disk":
        path = _save_to_disk(fmt, tmp_path, image_dir)
    elif kind == "hub":  # a hub-style repository folder, loaded through datasets.load_dataset
        repo = tmp_path / "repo"
        (repo / "data").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(_records(fmt, "bytes" if fmt == "easyr1" else "url",
                                                     image_dir)), repo / "data" / "train-00000.parquet")
        return f"{repo}@train"
    else:
        raise ValueError(kind)
    return str(path)


def _save_to_disk(fmt: str, tmp_path, image_dir):
    import datasets

    path = tmp_path / "saved"
    if fmt == "easyr1":  # an Image feature: rows come back holding PIL images
        features = datasets.Features({"problem": datasets.Value("string"), "answer": datasets.Value("string"),
                                      "images": datasets.Sequence(datasets.Image())})
        rows = [{"problem": q, "answer": a, "images": [Image.open(image_dir / n) for n in names]}
                for q, names, a in ROWS]
        ds = datasets.Dataset.from_list(rows, features=features)
        assert isinstance(ds[1]["images"][0], Image.Image)
    else:
        ds = datasets.Dataset.from_list(_records(fmt, "url", image_dir))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return f"{path}@train"


SOURCES = ["jsonl", "json", "parquet", "folder", "save_to_disk", "hub"]


@pytest.mark.parametrize("fmt", ["easyr1", "lmm_r1"])
@pytest.mark.parametrize("source", SOURCES)
def test_every_format_and_source_gives_the_reference_inputs(fmt, source, tmp_path, image_dir,
                                                             processor, expected):
    spec = _write_source(source, fmt, tmp_path, image_dir)
    ds = PromptDataset(spec, data_cfg(format=fmt), processor)
    assert len(ds) == 3
    for item, (text, ids, images, answer) in zip(ds, expected):
        assert item.prompt == text
        assert item.prompt_token_ids == ids
        assert item.answer == answer
        assert [im.size for im in item.images] == [im.size for im in images]
        assert [im.tobytes() for im in item.images] == [im.tobytes() for im in images]


def test_format_prompt_and_system_prompt(processor, tmp_path, image_dir):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": "<image>How many red circles?", "images": ["imgs/red.png"],
                                "answer": "1"}) + "\n")
    template = tmp_path / "mine.jinja"
    template.write_text("Question: {{ content }} Answer briefly.\n")
    ds = PromptDataset(str(path), data_cfg(format_prompt=str(template), system_prompt="Be brief."), processor)
    assert ds[0].prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQuestion: "
                            f"{VS}How many red circles? Answer briefly.<|im_end|>\n<|im_start|>assistant\n")
    shipped = PromptDataset(str(path), data_cfg(format_prompt="math"), processor)
    assert "\\boxed{}" in shipped[0].prompt and shipped[0].prompt.count("<|image_pad|>") == 1


def test_format_prompt_that_duplicates_images_is_an_error(processor, tmp_path, image_dir):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": "<image>Count.", "images": ["imgs/red.png"], "answer": "1"}) + "\n")
    template = tmp_path / "twice.jinja"
    template.write_text("{{ content }} {{ content }}")
    with pytest.raises(DataError, match=r"d.jsonl line 1: format prompt .* changed the number"):
        PromptDataset(str(path), data_cfg(format_prompt=str(template)), processor)


def test_overlong_prompts_are_dropped_and_counted_never_truncated(processor, tmp_path, image_dir, caplog):
    path = _write_source("jsonl", "easyr1", tmp_path, image_dir)
    # Hand count: the text row is 16 tokens; the image rows are far longer (>= 16 image tokens each).
    short = len(processor.tokenizer(EXPECTED_TEXT[0], add_special_tokens=False)["input_ids"])
    with caplog.at_level(logging.INFO, logger="mcore_r1.data"):
        ds = PromptDataset(path, data_cfg(max_prompt_length=short), processor)
    assert [item.answer for item in ds] == ["5"]
    assert ds.stats.dropped_overlong == 2 and ds.stats.rows == 3
    assert "1 of 3 rows kept; 2 dropped as longer than max_prompt_length" in caplog.text
    with pytest.raises(DataError, match=r"train.jsonl line 2: prompt has \d+ tokens > data.max_prompt_length"):
        PromptDataset(path, data_cfg(max_prompt_length=short, filter_overlong_prompts=False), processor)


def test_pixel_limits_change_image_tokens(processor, vl_dir, tmp_path, image_dir):
    """The limits reach the processor. Hand-worked with Qwen's resize rule (multiples of 28):
    100x80 at the defaults -> 112x84 = 8x6 patches = 12 merged tokens; capped at 56*56 pixels
    -> scale by sqrt(8000/3136), floor to 56x28 = 4x2 patches = 2 merged tokens."""
    from mcore_r1.data import load_processor

    path = _write_source("jsonl", "easyr1", tmp_path, image_dir)
    small = load_processor(vl_dir, data_cfg(min_pixels=56 * 56, max_pixels=56 * 56))
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert PromptDataset(path, data_cfg(), processor)[1].prompt_token_ids.count(pad) == 12
    ds = PromptDataset(path, data_cfg(min_pixels=56 * 56, max_pixels=56 * 56), small)
    assert ds[1].prompt_token_ids.count(pad) == 2
