"""Bad input: each problem is an error naming the file and row, or a counted, logged skip."""

from __future__ import annotations

import json
import logging

import pytest

from mcore_r1.data import DataError, PromptDataset
from tests.data.conftest import data_cfg

GOOD = {"problem": "<image>How many?", "images": ["imgs/red.png"], "answer": "1"}
BAD_LINES = {
    2: ('{"problem": "What is 1 + 1?", "answer": ', r"line 2: malformed JSON"),
    3: (json.dumps({"problem": "<image>Count.", "images": ["imgs/gone.png"], "answer": "2"}),
        r"line 3 image 0: image file 'imgs/gone.png' not found"),
    4: (json.dumps({"problem": "What is 2 + 2?", "solution": "4"}), r"line 4: no answer \(key 'answer'"),
    5: (json.dumps({"problem": "<image><image>Count.", "images": ["imgs/red.png"], "answer": "2"}),
        r"line 5: 2 <image> tag\(s\) in 'problem' but 1 image\(s\)"),
    6: (json.dumps({"problem": "Count.", "images": ["imgs/red.png"], "answer": "2"}),
        r"line 6: 0 <image> tag\(s\) in 'problem' but 1 image\(s\)"),
}


def _write(tmp_path, bad_line: int) -> str:
    lines = [json.dumps(GOOD)] * 6
    lines[bad_line - 1] = BAD_LINES[bad_line][0]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("line", sorted(BAD_LINES))
def test_bad_row_is_an_error_naming_file_and_row(line, tmp_path, image_dir, processor):
    path = _write(tmp_path, line)
    with pytest.raises(DataError, match=BAD_LINES[line][1]) as info:
        PromptDataset(path, data_cfg(), processor)
    assert str(info.value).startswith(f"{path} line {line}")


def test_bad_rows_skipped_counted_and_logged_when_configured(tmp_path, image_dir, processor, caplog):
    lines = [json.dumps(GOOD)] + [BAD_LINES[i][0] for i in sorted(BAD_LINES)] + [json.dumps(GOOD)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="mcore_r1.data"):
        ds = PromptDataset(str(path), data_cfg(skip_bad_rows=True), processor)
    assert [item.where for item in ds] == [f"{path} line 1", f"{path} line 7"]
    assert ds.stats.skipped_bad == 5 and ds.stats.rows == 7
    assert "2 of 7 rows kept" in caplog.text and "5 bad rows skipped" in caplog.text
    assert f"skipping bad row: {path} line 3 image 0: image file 'imgs/gone.png' not found" in caplog.text


def test_lmm_r1_bad_message(tmp_path, image_dir, processor):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"message": "[{'role': 'user'}]", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl line 1: 'message' is not valid JSON"):
        PromptDataset(str(path), data_cfg(format="lmm_r1"), processor)


def test_missing_source_and_empty_dataset(tmp_path, processor):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptDataset(str(tmp_path / "nope.jsonl"), data_cfg(), processor)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no usable rows"):
        PromptDataset(str(tmp_path / "empty.jsonl"), data_cfg(), processor)


def test_image_dir_is_searched_first(tmp_path, image_dir, processor):
    elsewhere = tmp_path / "data"
    elsewhere.mkdir()
    (elsewhere / "d.jsonl").write_text(json.dumps(dict(GOOD, images=["red.png"])) + "\n")
    with pytest.raises(DataError, match="not found"):
        PromptDataset(str(elsewhere / "d.jsonl"), data_cfg(), processor)
    ds = PromptDataset(str(elsewhere / "d.jsonl"), data_cfg(image_dir=str(image_dir)), processor)
    assert ds[0].images[0].size == (100, 80)
