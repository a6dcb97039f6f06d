"""Rollout: vLLM engines (`engine`); the colocated wrapper and weight refit arrive later."""
