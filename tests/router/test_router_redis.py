"""Limits shared by two router hosts through a real `redis-server` (the Debian package
scripts/setup installs): a key's rpm and tpm, and a user's quota over two of their keys,
hold across both routers; with Redis killed mid-run each router falls back as
`limits.on_store_down` says (counting alone, or refusing), logs it and counts it in
/metrics; with Redis back the limits are shared again."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from router_harness import Harness, Proc, key_hash, metric, replica, stats

from router.store import IncompleteReply, StoreError, parse_reply

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


class Redis:
    """A redis-server on a free loopback port, without persistence."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        assert Path(binary).exists(), "redis-server is missing: scripts/setup installs it"
        self.binary, self.tmp = binary, tmp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=(self.tmp / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start: "
                             + (self.tmp / "redis.log").read_text(errors="replace"))

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    try:
        yield server
    finally:
        server.kill()


def post(port: int, key: str, body: dict[str, Any] = BODY) -> httpx.Response:
    with httpx.Client() as c:
        return c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=10)


def codes(port: int, key: str, n: int) -> list[int]:
    return [post(port, key).status_code for _ in range(n)]


def two_routers(harness: Harness, extra: dict[str, Any]) -> tuple[Proc, Proc, Proc]:
    """Two router processes (two hosts, as far as limits go) on one config, one upstream."""
    up = harness.upstream()
    config = {"models": [{"name": "m", "replicas": [replica("a", up)]}], **extra}
    return harness.router(config), harness.router(config), up


def test_a_keys_rpm_holds_across_two_routers_and_not_without_the_store(
        harness: Harness, redis: Redis) -> None:
    keys = [{"name": "capped", "hash": key_hash("sk-capped"), "rpm": 5},
            {"name": "free", "hash": key_hash("sk-free")}]
    a, b, up = two_routers(harness, {"keys": keys, "limits": {"store": redis.url}})
    assert codes(a.port, "sk-capped", 3) + codes(b.port, "sk-capped", 2) == [200] * 5
    assert codes(a.port, "sk-capped", 1) + codes(b.port, "sk-capped", 1) == [429, 429]
    refused = post(b.port, "sk-capped").json()["error"]
    assert refused["code"] == "rate_limit_exceeded" and "key `capped`" in refused["message"]
    assert codes(b.port, "sk-free", 3) == [200] * 3  # no limits: never asks the store
    assert stats(up)["/v1/chat/completions"] == 8
    assert metric(a.port, "modelstack_router_limit_store_up") == 1
    # the same two routers counting alone allow the key twice its rpm
    c, d, _ = two_routers(harness, {"keys": keys})
    assert codes(c.port, "sk-capped", 5) + codes(d.port, "sk-capped", 5) == [200] * 10


def test_tpm_settles_the_used_tokens_in_the_store(harness: Harness, redis: Redis) -> None:
    """Each request reserves about 25 tokens (its body and max_tokens 5) and uses 15 (the
    canned usage): with the reservations settled to 15 in Redis, 6 fit in 100 tokens over
    both routers; unsettled, 4 would."""
    keys = [{"name": "t", "hash": key_hash("sk-t"), "tpm": 100}]
    a, b, _ = two_routers(harness, {"keys": keys, "limits": {"store": redis.url}})
    got = []
    for i in range(8):
        got.append(post((a, b)[i % 2].port, "sk-t").status_code)
        time.sleep(0.05)  # the settle is sent without waiting: let it land
    assert got == [200] * 6 + [429, 429], got
    assert metric(a.port, "modelstack_router_tokens_total", key="t") + metric(
        b.port, "modelstack_router_tokens_total", key="t") == 6 * 15


def test_a_users_quota_holds_across_their_keys_and_both_routers(
        harness: Harness, redis: Redis) -> None:
    config = {"users": [{"name": "alice", "rpm": 4}],
              "keys": [{"name": "laptop", "user": "alice", "hash": key_hash("sk-laptop")},
                       {"name": "ci", "user": "alice", "hash": key_hash("sk-ci"), "rpm": 100},
                       {"name": "bob", "hash": key_hash("sk-bob")}],
              "limits": {"store": redis.url}}
    a, b, _ = two_routers(harness, config)
    assert codes(a.port, "sk-laptop", 2) + codes(b.port, "sk-ci", 2) == [200] * 4
    refused = post(b.port, "sk-laptop")
    assert refused.status_code == 429
    assert refused.json()["error"]["message"].startswith(
        "the user `alice` (the key `laptop`'s) is over its rpm limit")
    assert post(a.port, "sk-ci").status_code == 429  # the ci key's own rpm is far off
    assert codes(a.port, "sk-bob", 3) == [200] * 3
    assert metric(b.port, "modelstack_router_rate_limited_total", key="laptop",
                  limit="user_rpm") == 1
    assert metric(a.port, "modelstack_router_requests_total", user="alice") == 3  # 2 + 1 refused
    assert metric(a.port, "modelstack_router_tokens_total", user="alice",
                  type="completion") == 2 * 5


def test_redis_killed_the_routers_count_alone_then_share_again(
        harness: Harness, redis: Redis) -> None:
    keys = [{"name": "capped", "hash": key_hash("sk-capped"), "rpm": 4}]
    a, b, _ = two_routers(harness, {"keys": keys, "limits": {"store": redis.url}})
    assert codes(a.port, "sk-capped", 2) + codes(b.port, "sk-capped", 2) == [200] * 4
    redis.kill()
    # each router now counts alone, from nothing: 4 more on each, then its own 429
    assert codes(a.port, "sk-capped", 5) == [200] * 4 + [429]
    assert codes(b.port, "sk-capped", 5) == [200] * 4 + [429]
    assert metric(a.port, "modelstack_router_limit_store_up") == 0
    assert metric(a.port, "modelstack_router_limit_store_fallbacks_total", action="local") == 5
    assert "the limit store 127.0.0.1" in a.log.read_text() and "is down" in a.log.read_text()
    redis.start()  # an empty store: the windows start again
    time.sleep(1.2)  # a router tries again at most once a second
    assert codes(a.port, "sk-capped", 3) + codes(b.port, "sk-capped", 2) == [200] * 4 + [429]
    assert metric(a.port, "modelstack_router_limit_store_up") == 1
    assert metric(a.port, "modelstack_router_limit_store_changes_total") == 3  # up, down, up
    assert "is up; limits are shared" in b.log.read_text()


def test_with_refuse_a_limited_request_gets_a_503_while_redis_is_down(
        harness: Harness, redis: Redis) -> None:
    keys = [{"name": "capped", "hash": key_hash("sk-capped"), "rpm": 100},
            {"name": "free", "hash": key_hash("sk-free")}]
    a, _, _ = two_routers(harness, {"keys": keys, "limits": {
        "store": redis.url, "on_store_down": "refuse"}})
    assert post(a.port, "sk-capped").status_code == 200
    redis.kill()
    down = post(a.port, "sk-capped")
    assert down.status_code == 503 and down.headers["retry-after"] == "1"
    assert down.json()["error"]["code"] == "limit_store_unavailable"
    assert post(a.port, "sk-free").status_code == 200  # keys without limits go on
    assert metric(a.port, "modelstack_router_limit_store_fallbacks_total",
                  action="refuse") == 1


@pytest.mark.parametrize(("data", "reply"), [
    (b"+OK\r\n", b"OK"), (b":42\r\n", 42), (b"$-1\r\n", None), (b"$3\r\nabc\r\n", b"abc"),
    (b"*3\r\n:1\r\n:1700000000\r\n:25\r\n", [1, 1700000000, 25]), (b"*-1\r\n", None),
])
def test_resp_replies_parse_whole_and_wait_for_the_rest(data: bytes, reply: object) -> None:
    assert parse_reply(data) == (reply, len(data))
    for cut in range(1, len(data) - 1):  # every prefix is incomplete, never misread
        with pytest.raises(IncompleteReply):
            parse_reply(data[:cut])


def test_a_resp_error_or_junk_is_a_store_error() -> None:
    error, _ = parse_reply(b"-NOSCRIPT No matching script\r\n")
    assert isinstance(error, StoreError) and str(error).startswith("NOSCRIPT")
    with pytest.raises(StoreError):
        parse_reply(b"?what\r\n")
    with pytest.raises(ValueError):
        parse_reply(b":12x\r\n")
