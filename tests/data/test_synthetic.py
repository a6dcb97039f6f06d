"""Synthetic tasks: byte-identical re-runs, answers checked independently of the generator."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import operator
import re
from pathlib import Path

import numpy as np
from PIL import Image

from mcore_r1.config.schema import DataConfig
from mcore_r1.data import resolve_source
from mcore_r1.data.synthetic import DRAW_COLORS, ensure_synthetic, write_synthetic

REPO = Path(__file__).resolve().parents[2]


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def blobs(mask: np.ndarray) -> int:
    """Connected components (4-neighbour flood fill): an independent count of drawn shapes."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_same_settings_same_bytes_other_seed_differs(tmp_path):
    a = tree_hash(write_synthetic("counting", tmp_path / "a", 6, 3, seed=0))
    b = tree_hash(write_synthetic("counting", tmp_path / "b", 6, 3, seed=0))
    c = tree_hash(write_synthetic("counting", tmp_path / "c", 6, 3, seed=1))
    assert a == b
    assert len(a) == 2 + 9 and a["train.jsonl"] != c["train.jsonl"]


def test_counting_answers_match_the_pictures(tmp_path):
    out = write_synthetic("counting", tmp_path / "count", 24, 8, seed=0)
    answers = []
    for split in ("train", "test"):
        for line in (out / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            color, _ = re.fullmatch(r"<image>How many (\w+) (\w+) are in the image\?", row["problem"]).groups()
            pixels = np.asarray(Image.open(out / row["images"][0]).convert("RGB"))
            mask = (pixels == np.array(DRAW_COLORS[color])).all(-1)
            assert blobs(mask) == int(row["answer"]), row  # distractors use other colours
            answers.append(int(row["answer"]))
    assert len(set(answers)) >= 4  # the task is not degenerate


def test_arithmetic_answers(tmp_path):
    out = write_synthetic("arithmetic", tmp_path / "arith", 50, 10, seed=0)
    assert not (out / "images").exists()
    for line in (out / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*/]) (\d+)\?", row["problem"]).groups()
        a, b = int(a), int(b)
        value = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}[op](a, b)
        assert float(row["answer"]) == value


def test_loader_builds_the_synthetic_task_when_train_files_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("MCORE_R1_CACHE", str(tmp_path))
    cfg = DataConfig(synthetic="arithmetic", synthetic_train_size=5, synthetic_test_size=2, synthetic_seed=4)
    train = resolve_source(cfg, "train")
    assert train == str(tmp_path / "synthetic" / "arithmetic-seed4-train5-test2" / "train.jsonl")
    assert resolve_source(cfg, "test").endswith("test.jsonl")
    assert len(Path(train).read_text().splitlines()) == 5
    before = Path(train).stat().st_mtime_ns
    assert ensure_synthetic("arithmetic", 5, 2, seed=4) == Path(train).parent
    assert Path(train).stat().st_mtime_ns == before  # cached, not rebuilt
    cfg.train_files = "mine.jsonl"
    import pytest

    with pytest.raises(ValueError, match="data.val_files is empty"):
        resolve_source(cfg, "test")


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("msd", REPO / "tools" / "make_synthetic_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--task", "counting", "--out", str(tmp_path / "c"), "--train", "3", "--test", "2"]) == 0
    assert "counting: wrote 3 train + 2 test rows" in capsys.readouterr().out
    assert tree_hash(tmp_path / "c") == tree_hash(write_synthetic("counting", tmp_path / "d", 3, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d"]  # no temp dirs left


def test_data_check_report(tmp_path, monkeypatch, processor, vl_dir):
    from mcore_r1.data.check import report

    monkeypatch.setenv("MCORE_R1_CACHE", str(tmp_path))
    cfg = DataConfig(synthetic="counting", synthetic_train_size=3, synthetic_test_size=2, format_prompt="r1v")
    text = report(cfg, vl_dir)
    assert "3 of 3 rows kept; 0 dropped" in text and "2 of 2 rows kept" in text
    assert "images per prompt: 1: 3 rows" in text and "images per prompt: 1: 2 rows" in text
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>How many") == 2  # one per split
    first = json.loads((tmp_path / "synthetic" / "counting-seed0-train3-test2" / "train.jsonl").read_text().splitlines()[0])
    assert f"answer {first['answer']!r}" in text


def test_difficulty_knobs_bound_the_items_and_name_the_cache(tmp_path):
    import json

    import pytest

    from mcore_r1.data.synthetic import Difficulty

    easy = Difficulty(max_count=4, max_distractors=0, max_operand=9)
    out = ensure_synthetic("counting", 40, 4, seed=0, root=tmp_path, level=easy)
    assert out.name == "counting-seed0-train40-test4-max4-distract0-grid4"
    answers = {int(json.loads(l)["answer"]) for l in (out / "train.jsonl").read_text().splitlines()}
    assert answers == {1, 2, 3, 4}  # 40 draws from 1..4 hit every value
    arith = ensure_synthetic("arithmetic", 60, 4, seed=0, root=tmp_path, level=easy)
    assert arith.name.endswith("-operand9")
    for line in (arith / "train.jsonl").read_text().splitlines():
        a, op, b = json.loads(line)["problem"][len("What is "):-1].split()
        if op in "+-":
            assert int(a) <= 9 and int(b) <= 9
    assert ensure_synthetic("counting", 40, 4, seed=0, root=tmp_path).name == "counting-seed0-train40-test4"
    with pytest.raises(ValueError, match="grid cells"):
        Difficulty(max_count=15, max_distractors=3)
