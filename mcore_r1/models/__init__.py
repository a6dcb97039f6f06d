"""Model support: ``registry`` (supported HF architectures and their shapes) and ``tiny``
(offline, randomly initialised tiny checkpoints for tests and smoke runs)."""
