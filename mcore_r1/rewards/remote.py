"""Remote reward client: batched HTTP POSTs with timeouts, bounded retries and validation.

Protocol (a superset of OpenRLHF's ``--remote_rm_url``, so its servers work unchanged):

    POST <url>  {"query": [prompt + response, ...], "prompts": [...], "responses": [...],
                 "labels": [ground truth, ...]}
    200         {"rewards": [float | {"overall": float, <part>: float, ...}, ...]}

One request carries up to ``remote_batch_size`` samples. A request that fails (connection
error, timeout, HTTP 5xx or 429, a body that is not the JSON above with one reward per sample)
is retried ``retries`` times with exponential backoff; other 4xx answers mean the request itself
is wrong and are not retried. When all attempts fail the batch gets the fallback score and the
``remote_failures`` counter grows, so training carries on and the problem shows in the logs.
Only the standard library is used.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections import Counter

from mcore_r1.rewards.loader import RewardFunctionError, normalize

log = logging.getLogger("mcore_r1.rewards")


class RemoteRewardError(RuntimeError):
    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class RemoteRewardClient:
    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, batch_size: int = 64,
                 fallback: float = 0.0, backoff_s: float = 0.5):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward.remote_url={url!r} must start with http:// or https://")
        if retries < 0 or batch_size < 1 or timeout_s <= 0:
            raise ValueError("remote reward needs retries >= 0, batch_size >= 1 and timeout_s > 0")
        self.url, self.timeout_s, self.retries = url, timeout_s, retries
        self.batch_size, self.fallback, self.backoff_s = batch_size, float(fallback), backoff_s
        self.counters: Counter = Counter()

    def score(self, samples: list[dict]) -> list[dict[str, float]]:
        out: list[dict[str, float]] = []
        for start in range(0, len(samples), self.batch_size):
            out.extend(self._score_batch(samples[start:start + self.batch_size]))
        return out

    def _score_batch(self, batch: list[dict]) -> list[dict[str, float]]:
        body = json.dumps({
            "query": [s.get("prompt", "") + s["response"] for s in batch],
            "prompts": [s.get("prompt", "") for s in batch],
            "responses": [s["response"] for s in batch],
            "labels": [str(s["ground_truth"]) for s in batch],
        }).encode()
        for attempt in range(self.retries + 1):
            try:
                return self._post(body, len(batch))
            except RemoteRewardError as err:
                last = err
                log.warning("remote reward attempt %d/%d failed: %s", attempt + 1, self.retries + 1, err)
                if not err.retryable or attempt == self.retries:
                    break
                self.counters["remote_retries"] += 1
                time.sleep(self.backoff_s * 2 ** attempt)
        self.counters["remote_failures"] += len(batch)
        log.warning("remote reward gave up on %d sample(s) (%s): using fallback score %s",
                    len(batch), last, self.fallback)
        return [{"overall": self.fallback} for _ in batch]

    def _post(self, body: bytes, n: int) -> list[dict[str, float]]:
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            retryable = err.code >= 500 or err.code == 429
            raise RemoteRewardError(f"{self.url}: HTTP {err.code} {err.reason}", retryable) from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise RemoteRewardError(f"{self.url}: {getattr(err, 'reason', err)}", True) from err
        return self._parse(raw, n)

    def _parse(self, raw: bytes, n: int) -> list[dict[str, float]]:
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RemoteRewardError(f"{self.url}: response is not JSON ({err})", True) from err
        rewards = data.get("rewards") if isinstance(data, dict) else None
        if not isinstance(rewards, list) or len(rewards) != n:
            got = f"{len(rewards)} rewards" if isinstance(rewards, list) else f"{type(data).__name__} without 'rewards' list"
            raise RemoteRewardError(f"{self.url}: expected {{'rewards': [{n} values]}}, got {got}", True)
        try:
            return [normalize(r, self.url) for r in rewards]
        except RewardFunctionError as err:
            raise RemoteRewardError(str(err), True) from err
