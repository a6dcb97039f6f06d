"""The one exception type for bad dataset input, always naming where the problem is.

`where` is a human-readable location such as ``train.jsonl line 7`` or ``data.parquet row 3``;
the loader either raises it or, with ``data.skip_bad_rows``, counts and logs it.
"""

from __future__ import annotations


class DataError(ValueError):
    """A dataset row (or file) that cannot be used; the message starts with its location."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")
