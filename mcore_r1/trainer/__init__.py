"""The driver side of training: Ray placement, the RL loop, batches, advantages, metrics.

`run.run_training(cfg)` is what `python -m mcore_r1.main` calls; `placement` starts the
hybrid workers (`mcore_r1.workers.hybrid`) on Ray; `rollout`, `batch` and `advantage` are the
loop's phases; `metrics` writes the console line, metrics.jsonl and TensorBoard.
"""
