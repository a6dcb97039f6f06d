"""Build the offline tiny test checkpoints: ``python tools/make_tiny_models.py --out DIR``.

Writes ``DIR/<name>`` for each requested model (default: all) and prints what it wrote. Models
already present are kept unless ``--force``. All logic lives in ``mcore_r1.models.tiny``.
"""

from __future__ import annotations

import argparse

from mcore_r1.models import tiny


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="root directory; models go to OUT/<name>")
    parser.add_argument("--names", nargs="+", choices=tiny.TINY_MODEL_NAMES,
                        default=list(tiny.TINY_MODEL_NAMES), help="models to build (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed")
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = tiny.build_tiny_models(args.out, args.names, seed=args.seed, force=args.force)
    for name, (path, built) in results.items():
        status = f"built (seed {args.seed})" if built else "already present, kept (use --force)"
        print(f"{name}: {status}\n{tiny.describe_checkpoint(path)}")


if __name__ == "__main__":
    main()
