"""The remote reward client against a real HTTP server on loopback, started by the test."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mcore_r1.config.schema import RewardConfig
from mcore_r1.rewards import RemoteRewardClient, RewardManager


class Server:
    """A loopback reward server whose behaviour per request is scripted by the test."""

    def __init__(self, script):
        self.script = script  # list of modes, one per request; the last one repeats
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                mode = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                if mode == "slow":
                    time.sleep(1.0)
                if mode in ("503", "400"):
                    self.send_error(int(mode))
                    return
                rewards = [{"overall": float(len(r)), "label_match": float(r == l)}
                           for r, l in zip(body["responses"], body["labels"])]
                if mode == "short":
                    rewards = rewards[:-1]
                payload = b"not json" if mode == "garbage" else json.dumps({"rewards": rewards}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/get_reward"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def samples(*responses):
    return [{"prompt": "P:", "response": r, "ground_truth": "ab", "response_length": 1} for r in responses]


def test_batches_and_validated_results():
    with Server(["ok"]) as server:
        client = RemoteRewardClient(server.url, batch_size=2, backoff_s=0.01)
        out = client.score(samples("a", "ab", "abc", "", "abcd"))
    assert out == [{"overall": 1.0, "label_match": 0.0}, {"overall": 2.0, "label_match": 1.0},
                   {"overall": 3.0, "label_match": 0.0}, {"overall": 0.0, "label_match": 0.0},
                   {"overall": 4.0, "label_match": 0.0}]
    assert [len(r["responses"]) for r in server.requests] == [2, 2, 1]
    assert server.requests[0] == {"query": ["P:a", "P:ab"], "prompts": ["P:", "P:"],
                                  "responses": ["a", "ab"], "labels": ["ab", "ab"]}
    assert client.counters == {}


@pytest.mark.parametrize("script, n_requests, ok", [
    (["503", "ok"], 2, True),                 # transient server error: retried
    (["garbage", "ok"], 2, True),             # not JSON: retried
    (["short"], 3, False),                    # wrong number of rewards every time: gives up
    (["slow"], 3, False),                     # longer than the timeout every time: gives up
    (["400"], 1, False),                      # a client error is not retried
])
def test_retries_are_bounded_and_failures_fall_back(script, n_requests, ok):
    with Server(script) as server:
        client = RemoteRewardClient(server.url, timeout_s=0.3, retries=2, fallback=-1.0, backoff_s=0.01)
        out = client.score(samples("ab", "x"))
        time.sleep(0.05)  # let a slow handler finish recording before counting requests
    assert len(server.requests) == n_requests
    if ok:
        assert out == [{"overall": 2.0, "label_match": 1.0}, {"overall": 1.0, "label_match": 0.0}]
        assert client.counters["remote_failures"] == 0
    else:
        assert out == [{"overall": -1.0}, {"overall": -1.0}]
        assert client.counters["remote_failures"] == 2


def test_unreachable_server_and_manager_wiring():
    with Server(["ok"]) as server:
        manager = RewardManager(RewardConfig(remote_url=server.url, remote_retries=0))
        assert manager.score(samples("ab"))[0] == {"overall": 2.0, "label_match": 1.0}
        url = server.url
    # Server gone: connection refused, one retry, then the fallback score.
    client = RemoteRewardClient(url, retries=1, timeout_s=1.0, backoff_s=0.01)
    assert client.score(samples("a")) == [{"overall": 0.0}]
    assert client.counters == {"remote_retries": 1, "remote_failures": 1}
    with pytest.raises(ValueError, match="must start with http"):
        RemoteRewardClient("localhost:8000")
