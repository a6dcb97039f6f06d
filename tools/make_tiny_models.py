"""Build the offline tiny test checkpoints: ``python tools/make_tiny_models.py --out DIR``.

Writes ``DIR/<name>`` for each requested model (default: all) and prints what it wrote. Models
already present are kept unless ``--force``. All logic lives in ``mcore_r1.models.tiny``.

``--warm-start TASK`` also writes ``DIR/<name>-warm-TASK-<hash>`` for each requested model: the
same model after a short supervised phase that teaches TASK's answer format but not its answers
(``mcore_r1.models.warmstart``), on the shipped data settings of TASK (the hash names them;
experiments with other settings build their own on first use). Kept if present unless ``--force``.
"""

from __future__ import annotations

import argparse

from mcore_r1.models import tiny, warmstart


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="root directory; models go to OUT/<name>")
    parser.add_argument("--names", nargs="+", choices=tiny.TINY_MODEL_NAMES,
                        default=list(tiny.TINY_MODEL_NAMES), help="models to build (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed")
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    parser.add_argument("--warm-start", metavar="TASK", choices=warmstart.TASKS, default=None,
                        help="also build <name>-warm-TASK-<hash>: format-only SFT on synthetic task TASK")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = tiny.build_tiny_models(args.out, args.names, seed=args.seed, force=args.force)
    for name, (path, built) in results.items():
        status = f"built (seed {args.seed})" if built else "already present, kept (use --force)"
        print(f"{name}: {status}\n{tiny.describe_checkpoint(path)}")
    if args.warm_start:
        import shutil
        from pathlib import Path

        for name in args.names:
            if not warmstart.supports(name, args.warm_start):
                print(f"{name}-warm-{args.warm_start}: skipped (a text model cannot read its prompts)")
                continue
            warm_dir = Path(args.out) / warmstart.warm_model_name(name, args.warm_start)
            if args.force and warm_dir.exists():
                shutil.rmtree(warm_dir)  # its base was just rebuilt; retrain on top of it
            existed = tiny.is_complete(warm_dir)
            path = warmstart.ensure_warm_model(name, args.warm_start, args.out, seed=args.seed)
            status = "already present, kept (use --force)" if existed else f"warm-started (seed {args.seed})"
            print(f"{path.name}: {status}\n{tiny.describe_checkpoint(path)}")


if __name__ == "__main__":
    main()
