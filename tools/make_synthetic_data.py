#!/usr/bin/env python
"""Write the synthetic datasets (counting shapes, arithmetic) as EasyR1 jsonl with splits.

    ./run.sh python tools/make_synthetic_data.py --task counting --out data/counting
    ./run.sh python tools/make_synthetic_data.py --task arithmetic --out data/arith --train 2000

Same task, seed and sizes always give byte-identical files. Point training or evaluation at
them with ``data.train_files=DIR/train.jsonl data.val_files=DIR/test.jsonl``; with empty
``data.train_files`` the loader builds the same data itself into the cache.
"""

from __future__ import annotations

import argparse
import sys

from mcore_r1.data.synthetic import (
    GRID, MAX_DISTRACTORS, MAX_OPERAND, MAX_TARGETS, TASKS, Difficulty, write_synthetic,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--out", required=True, help="output directory (replaced if present)")
    parser.add_argument("--train", type=int, default=512, help="train split size")
    parser.add_argument("--test", type=int, default=64, help="test split size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-count", type=int, default=MAX_TARGETS, help="counting: most target shapes")
    parser.add_argument("--max-distractors", type=int, default=MAX_DISTRACTORS,
                        help="counting: most shapes of other colours")
    parser.add_argument("--max-operand", type=int, default=MAX_OPERAND, help="arithmetic: largest + / - operand")
    parser.add_argument("--grid", type=int, default=GRID, help="counting: grid x grid cells of 28 px")
    args = parser.parse_args(argv)
    level = Difficulty(args.max_count, args.max_distractors, args.max_operand, args.grid)
    out = write_synthetic(args.task, args.out, args.train, args.test, args.seed, level)
    print(f"{args.task}: wrote {args.train} train + {args.test} test rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
