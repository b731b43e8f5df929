"""A real 2-worker router (SO_REUSEPORT): limits and /metrics cover every worker.

Every request below goes on a fresh TCP connection, so the kernel spreads them over both
workers (the chance that 30 connections all land on one is 2^-29); per-process limits or
per-process metrics would fail these tests.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from router_harness import Harness, key_hash, metric, replica, stats

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def post(port: int, key: str) -> int:
    """One chat request on its own connection; the status."""
    with httpx.Client(headers={"Connection": "close"}) as c:
        return c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=BODY,
                      headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def test_rpm_limit_holds_across_workers(harness: Harness) -> None:
    up = harness.upstream()
    r = harness.router({"workers": 2,
                        "models": [{"name": "m", "replicas": [replica("a", up)]}],
                        "keys": [{"name": "capped", "hash": key_hash("sk-capped"), "rpm": 10},
                                 {"name": "free", "hash": key_hash("sk-free")}]})
    codes = [post(r.port, "sk-capped") for _ in range(30)]
    assert codes.count(200) == 10 and codes.count(429) == 20, codes
    assert codes[:10] == [200] * 10  # sequential: the first ten pass, wherever they landed
    assert stats(up)["/v1/chat/completions"] == 10
    # another key is not affected; the limit table is per key
    assert [post(r.port, "sk-free") for _ in range(5)] == [200] * 5


def test_metrics_count_requests_of_every_worker(harness: Harness) -> None:
    up = harness.upstream()
    r = harness.router({"workers": 2, "models": [{"name": "m", "replicas": [replica("a", up)]}],
                        "keys": [{"name": "k", "hash": key_hash("sk-k"), "rpm": 1000}]})
    for _ in range(30):
        assert post(r.port, "sk-k") == 200
    assert post(r.port, "sk-wrong") == 401
    for _ in range(6):  # each scrape on a new connection, answered by either worker
        assert metric(r.port, "modelstack_router_workers") == 2
        assert metric(r.port, "modelstack_router_requests_total", key="k", status="2xx") == 30
        assert metric(r.port, "modelstack_router_request_duration_seconds_count",
                      model="m") == 30
        assert metric(r.port, "modelstack_router_tokens_total", key="k",
                      type="completion") == 30 * 5
        assert metric(r.port, "modelstack_router_replica_up", replica="a") == 1
        assert metric(r.port, "modelstack_router_replica_in_flight", replica="a") == 0


def test_least_outstanding_sees_the_requests_of_every_worker(harness: Harness) -> None:
    """Two slow replicas, one request in flight, then a second on a new connection: it goes
    to the idle replica whichever worker takes it. Counting per worker, a second request
    landing on the other worker would see both replicas idle and pick either (a round fails
    with probability 1/4; all 16 pass by chance with probability 0.01)."""
    a, b = harness.upstream(), harness.upstream()
    r = harness.router({"workers": 2,
                        "models": [{"name": "m", "replicas": [replica("a", a), replica("b", b)]}]})
    slow = {**BODY, "canned_delay": 0.4}

    def slow_post() -> int:
        with httpx.Client(headers={"Connection": "close"}) as c:
            return c.post(f"http://127.0.0.1:{r.port}/v1/chat/completions", json=slow,
                          timeout=10).status_code

    with ThreadPoolExecutor(2) as pool:
        for round_ in range(16):
            first = pool.submit(slow_post)
            time.sleep(0.1)  # the first is in flight on one replica
            second = pool.submit(slow_post)
            assert first.result() == second.result() == 200
            served = (stats(a).get("/v1/chat/completions", 0),
                      stats(b).get("/v1/chat/completions", 0))
            assert served == (round_ + 1, round_ + 1), f"round {round_}: {served}"
