"""Synthetic datasets made offline, deterministically: counting shapes (vision) and arithmetic.

* ``counting``: a white picture with ``k`` shapes of one colour and kind (the target) and a few
  distractors of other colours, each in its own grid cell so none overlap; the question is
  "How many <colour> <shapes> are in the image?" and the answer is ``k``.
* ``arithmetic``: "What is a <op> b?" with small integers; division is always exact.

Both are written as EasyR1 records (``problem`` with ``<image>`` tags, ``answer``, ``images``
as paths relative to the jsonl file), split into ``train.jsonl`` and ``test.jsonl`` drawn from
independent seeded streams, so the same (task, seed, sizes) always gives byte-identical files
(PNG files carry no timestamps). Words come from the tiny tokenizer's vocabulary so every prompt
tokenises into whole words.

`ensure_synthetic` builds into a temporary sibling directory and renames it into place, so a
crash never leaves half a dataset; the data loader calls it when ``data.train_files`` is empty.
``tools/make_synthetic_data.py`` is a thin command line over `write_synthetic`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

from mcore_r1.models.tiny_tokenizer import COLORS, SHAPES

TASKS = ("counting", "arithmetic")
CELL = 28                 # px per grid cell: one merged 2 x 2 patch of 14 px in Qwen-VL
GRID = 4                  # 4 x 4 cells: 112 x 112 = 12544 px, inside the default [3136, 50176] bounds
MAX_TARGETS = 6
MAX_DISTRACTORS = 3
MAX_OPERAND = 99


@dataclass(frozen=True)
class Difficulty:
    """How hard the generated items are; the defaults are the standard tasks.

    counting: 1..max_count target shapes plus 0..max_distractors shapes of other colours, each in
    its own cell of a grid x grid picture (28 px cells, so one vision token per cell);
    arithmetic: operands of + and - up to max_operand (* and / stay within the 12 x 12 table).
    """

    max_count: int = MAX_TARGETS
    max_distractors: int = MAX_DISTRACTORS
    max_operand: int = MAX_OPERAND
    grid: int = GRID

    def __post_init__(self):
        if self.grid < 2:  # 2 x 2 cells of 28 px = 56 x 56 px, the processor's smallest image
            raise ValueError(f"grid={self.grid} must be >= 2")
        cells = self.grid * self.grid
        if not 1 <= self.max_count <= cells - self.max_distractors or self.max_distractors < 0:
            raise ValueError(f"counting needs 1 <= max_count and max_count + max_distractors <= "
                             f"{cells} grid cells (got {self.max_count}, {self.max_distractors})")
        if self.max_operand < 1:
            raise ValueError(f"max_operand={self.max_operand} must be >= 1")

    def tag(self, task: str) -> str:
        """Cache-name suffix for non-default settings of `task` (empty for the standard task)."""
        if task == "counting" and (self.max_count, self.max_distractors, self.grid) != (
                MAX_TARGETS, MAX_DISTRACTORS, GRID):
            return f"-max{self.max_count}-distract{self.max_distractors}-grid{self.grid}"
        if task == "arithmetic" and self.max_operand != MAX_OPERAND:
            return f"-operand{self.max_operand}"
        return ""
# Dark-enough colours on white; "white" itself would be invisible.
DRAW_COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220),
               "yellow": (230, 200, 20), "purple": (140, 50, 170), "orange": (245, 140, 20),
               "black": (0, 0, 0)}
assert set(DRAW_COLORS) <= set(COLORS)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif kind == "star":
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        draw.regular_polygon((cx, cy, r), n_sides=5, rotation=0, fill=fill)  # pentagon "star"
        draw.regular_polygon((cx, cy, r * 0.7), n_sides=5, rotation=36, fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def counting_example(rng: random.Random, level: Difficulty = Difficulty()) -> tuple[Image.Image, str, int]:
    """(image, question, answer) for one counting item."""
    color, kind = rng.choice(sorted(DRAW_COLORS)), rng.choice(sorted(SHAPES))
    k = rng.randint(1, level.max_count)
    # Distractors never share the target's colour, so colour alone identifies the targets.
    others = [(c, s) for c in sorted(DRAW_COLORS) for s in sorted(SHAPES) if c != color]
    distractors = [rng.choice(others) for _ in range(rng.randint(0, level.max_distractors))]
    grid, cell = level.grid, CELL
    cells = rng.sample(range(grid * grid), k + len(distractors))
    image = Image.new("RGB", (grid * cell, grid * cell), "white")
    draw = ImageDraw.Draw(image)
    for (c, s), where in zip([(color, kind)] * k + distractors, cells):
        x, y = (where % grid) * cell, (where // grid) * cell
        _draw_shape(draw, s, (x + 4, y + 4, x + cell - 4, y + cell - 4), DRAW_COLORS[c])
    return image, f"How many {color} {SHAPES[kind]} are in the image?", k


def arithmetic_example(rng: random.Random, level: Difficulty = Difficulty()) -> tuple[str, int]:
    op = rng.choice(("+", "-", "*", "/"))
    if op == "/":
        b = rng.randint(1, 12)
        a = b * rng.randint(0, 12)
        return f"What is {a} / {b}?", a // b
    top = level.max_operand
    a, b = rng.randint(0, top), rng.randint(0, top if op != "*" else min(top, 12))
    return f"What is {a} {op} {b}?", {"+": a + b, "-": a - b, "*": a * b}[op]


def _split_rows(task: str, split: str, size: int, seed: int, out_dir: Path,
                level: Difficulty) -> list[dict]:
    # A string seed is hashed deterministically (sha512) by random.Random: stable across runs.
    rng = random.Random(f"mcore_r1-{task}-{split}-{seed}")
    rows = []
    for i in range(size):
        if task == "counting":
            image, question, answer = counting_example(rng, level)
            rel = f"images/{split}_{i:05d}.png"
            image.save(out_dir / rel, format="PNG")
            rows.append({"problem": f"<image>{question}", "answer": str(answer), "images": [rel]})
        else:
            question, answer = arithmetic_example(rng, level)
            rows.append({"problem": question, "answer": str(answer)})
    return rows


def write_synthetic(task: str, out_dir: str | Path, train_size: int = 512, test_size: int = 64,
                    seed: int = 0, level: Difficulty = Difficulty()) -> Path:
    """Write `task` into `out_dir` (train.jsonl, test.jsonl, images/), replacing it atomically."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    if train_size < 1 or test_size < 1:
        raise ValueError(f"split sizes must be >= 1 (train {train_size}, test {test_size})")
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "images").mkdir(parents=True)
        for split, size in (("train", train_size), ("test", test_size)):
            rows = _split_rows(task, split, size, seed, tmp, level)
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        if task != "counting":
            (tmp / "images").rmdir()
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def default_synthetic_root() -> Path:
    cache = os.environ.get("MCORE_R1_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "mcore_r1"
    return base / "synthetic"


def ensure_synthetic(task: str, train_size: int = 512, test_size: int = 64, seed: int = 0,
                     root: Optional[str | Path] = None, level: Difficulty = Difficulty()) -> Path:
    """The cached dataset directory for these settings, built on first use."""
    root = Path(root) if root else default_synthetic_root()
    out_dir = root / f"{task}-seed{seed}-train{train_size}-test{test_size}{level.tag(task)}"
    if not (out_dir / "test.jsonl").is_file():  # test.jsonl is written last; renames are atomic
        write_synthetic(task, out_dir, train_size, test_size, seed, level)
    return out_dir
