"""Evaluation: `python -m mcore_r1.eval` (Hydra, `conf/eval.yaml`).

`runner.run_eval` generates with vLLM on a dataset split, scores with the configured reward and
writes ``metrics.json`` + ``samples.jsonl``; `metrics` holds accuracy, Brier, ECE, AUROC and
pass@k; `cache` keys results by model, dataset and settings. Kept import-light: the entry
point imports vLLM only when it actually generates.
"""
