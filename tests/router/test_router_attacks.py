"""Clients that try to wear the router down, against a real router process: each test
measures the router's memory (VmRSS) and open sockets before and after the attack and fails
when they grow past a bound. Timeouts are set small in router.json so each takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from router_harness import Harness, key_hash, metric, replica, rss_mb, sockets

RSS_BOUND_MB = 30.0
"""Most the router's memory may grow under one attack."""
CHAT = "/v1/chat/completions"


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response off a raw socket: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed after {data!r}")
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        body += piece
    return int(lines[0].split()[1]), headers, body


def error_of(body: bytes) -> dict[str, Any]:
    """The OpenAI-shaped error of an answer (all four fields present)."""
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def wait_until(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def settled(harness: Harness, config: dict[str, Any], nofile: int | None = None,
            ) -> tuple[int, int, float, int]:
    """Start the router, warm it up; (port, pid, RSS MB, sockets) before the attack."""
    r = harness.router(config, nofile=nofile)
    for _ in range(20):
        httpx.get(f"http://127.0.0.1:{r.port}/metrics")
    time.sleep(0.3)
    return r.port, r.proc.pid, rss_mb(r.proc.pid), sockets(r.proc.pid)


def models(harness: Harness) -> list[dict[str, Any]]:
    return [{"name": "m", "replicas": [replica("a", harness.upstream())]}]


def test_pipelined_answers_nobody_reads_stop_the_reading_then_the_connection_is_dropped(
        harness: Harness) -> None:
    up = harness.upstream()
    many = [{"name": f"m{i}", "replicas": [replica(f"r{i}", up)]} for i in range(10)]
    port, pid, rss, socks = settled(harness, {"models": many, "clients": {"send_timeout": 1}})
    request = b"GET /metrics HTTP/1.1\r\nHost: r\r\n\r\n"
    payload = request * (2 * 1024**2 // len(request))  # 2.4 KB answers: 160 MB
    attacker = connect(port)
    attacker.setblocking(False)
    sent, deadline = 0, time.monotonic() + 3
    while sent < len(payload) and time.monotonic() < deadline:
        try:
            sent += attacker.send(payload[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    time.sleep(0.5)
    grown = rss_mb(pid) - rss
    assert grown < RSS_BOUND_MB, f"RSS grew {grown:.1f} MB after {sent} bytes of requests"
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    # the attacker still holds its end, reading nothing: dropped after `send_timeout`
    assert wait_until(lambda: sockets(pid) <= socks, 5), (sockets(pid), socks)
    attacker.close()
    assert rss_mb(pid) - rss < RSS_BOUND_MB


def test_half_sent_requests_are_dropped_at_the_header_timeout_and_probes_keep_working(
        harness: Harness) -> None:
    port, pid, _, socks = settled(harness, {
        "models": models(harness), "health": {"interval": 0.2, "eject_after": 2},
        "clients": {"header_timeout": 2}})
    half = [connect(port) for _ in range(130)]
    for i, sock in enumerate(half):
        if i % 2:  # the other half sends nothing at all
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\nContent-Le")
    assert wait_until(lambda: sockets(pid) >= socks + 130, 1.5)
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["replicas_up"] == 1
    assert wait_until(lambda: sockets(pid) <= socks, 6), (sockets(pid), socks)
    status, headers, body = read_answer(half[1])
    assert (status, headers["connection"], error_of(body)["code"]) == (408, "close", "timeout")
    assert "`clients.header_timeout`" in error_of(body)["message"]
    assert half[0].recv(10) == b""  # a connection that never sent a byte is just closed
    for sock in half:
        sock.close()
    assert metric(port, "modelstack_router_replica_ejections_total") == 0
    assert metric(port, "modelstack_router_replica_up") == 1


def test_connections_over_the_cap_get_a_quick_503_and_probes_keep_their_sockets(
        harness: Harness) -> None:
    # 200 open files: the cap becomes (200 - 64 reserved - 1 probe) // 2 = 67 connections
    port, pid, _, socks = settled(harness, {
        "models": models(harness), "health": {"interval": 0.2, "eject_after": 2},
        "clients": {"header_timeout": 5}}, nofile=200)
    assert "allow 67 client connections" in (harness.tmp / "router.log").read_text()
    held = [connect(port) for _ in range(250)]
    time.sleep(1)  # a turned-away client has its answer at once
    turned_away = []
    for sock in held:
        sock.settimeout(0.01)
        with contextlib.suppress(TimeoutError, ConnectionError):
            turned_away.append(read_answer(sock))
    assert len(turned_away) >= 250 - 67 - 1
    status, headers, body = turned_away[0]
    assert (status, headers["retry-after"]) == (503, "1")
    assert error_of(body)["code"] == "too_many_connections"
    assert sockets(pid) <= socks + 67
    time.sleep(1.0)  # five probe rounds while the cap is held
    for sock in held:
        sock.close()
    assert wait_until(lambda: sockets(pid) <= socks, 3)
    assert metric(port, "modelstack_router_replica_ejections_total") == 0
    assert metric(port, "modelstack_router_replica_up") == 1


def test_a_body_declared_too_big_is_refused_before_it_arrives(harness: Harness) -> None:
    port, pid, rss, socks = settled(harness, {"models": models(harness),
                                              "max_body_bytes": 1000})
    for head in (b"Content-Length: 10000000000\r\n\r\n",
                 b"Transfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n"):
        sock = connect(port, timeout=2)
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n" + head)
        status, headers, body = read_answer(sock)
        assert time.monotonic() - started < 1
        assert (status, headers["connection"]) == (413, "close")
        assert error_of(body)["code"] == "request_too_large"
        assert "`max_body_bytes` (1000 bytes)" in error_of(body)["message"]
        sock.close()
    # a client that sends its whole (too big) body still reads the answer, not a reset
    resp = httpx.post(f"http://127.0.0.1:{port}{CHAT}", content=b"x" * 5_000_000)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert wait_until(lambda: sockets(pid) <= socks, 4)
    assert rss_mb(pid) - rss < RSS_BOUND_MB


def test_a_body_that_stops_coming_gets_a_408_at_the_body_timeout(harness: Harness) -> None:
    port, pid, _, socks = settled(harness, {"models": models(harness),
                                            "clients": {"body_timeout": 0.5}})
    with connect(port) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\":")
        started = time.monotonic()
        status, _, body = read_answer(sock)
        assert 0.4 < time.monotonic() - started < 2
        assert status == 408 and "`clients.body_timeout`" in error_of(body)["message"]
    assert wait_until(lambda: sockets(pid) <= socks, 2)


def test_huge_and_countless_junk_keys_leave_no_memory_behind(harness: Harness) -> None:
    port, pid, rss, socks = settled(harness, {
        "models": models(harness), "keys": [{"name": "k", "hash": key_hash("sk-good")}]})
    huge = b"Authorization: Bearer " + b"k" * (1 << 20) + b"\r\n\r\n"
    statuses: list[int] = []

    def send_huge(count: int) -> None:
        for _ in range(count):
            with connect(port) as sock:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: r\r\n" + huge)
                statuses.append(read_answer(sock)[0])

    threads = [threading.Thread(target=send_huge, args=(30,)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [431] * 300
    grown = rss_mb(pid) - rss
    assert grown < RSS_BOUND_MB, f"RSS grew {grown:.1f} MB after 300 keys of 1 MiB"
    # keys under the head limit, each new: all refused, none remembered
    with connect(port) as sock:
        for i in range(3000):
            key = b"%d-" % i + b"j" * 30000
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: r\r\n"
                         b"Authorization: Bearer %s\r\n\r\n" % key)
            assert read_answer(sock)[0] == 401
    grown = rss_mb(pid) - rss
    assert grown < RSS_BOUND_MB, f"RSS grew {grown:.1f} MB after 3,000 keys of 30 KB"
    assert wait_until(lambda: sockets(pid) <= socks, 4)


def test_a_keep_alive_connection_has_its_key_checked_on_every_request(
        harness: Harness) -> None:
    """Nothing of a key is kept between the requests of a connection: another key on it
    is refused, a repeated header is a 400, and a key dropped by a reload is refused on
    the connection that used it."""
    ups = models(harness)
    keys = [{"name": "a", "hash": key_hash("sk-a")}, {"name": "b", "hash": key_hash("sk-b")}]
    port, pid, _, _ = settled(harness, {"models": ups, "keys": keys})

    def ask(sock: socket.socket, *keys: bytes) -> tuple[int, bytes]:
        auth = b"".join(b"Authorization: Bearer %s\r\n" % key for key in keys)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: r\r\n%s\r\n" % auth)
        status, _, body = read_answer(sock)
        return status, body

    with connect(port) as sock:
        assert ask(sock, b"sk-a")[0] == 200
        assert ask(sock, b"sk-a")[0] == 200
        assert ask(sock, b"sk-a ")[0] == 200  # another header, the same key
        assert ask(sock, b"sk-x")[0] == 401
        assert ask(sock, b"sk-b")[0] == 200
        assert ask(sock, b"sk-a")[0] == 200
        status, body = ask(sock, b"sk-a", b"sk-a")
        assert status == 400 and error_of(body)["param"] == "authorization"
    with connect(port) as sock:
        assert ask(sock, b"sk-a")[0] == 200
        harness.write({"listen": "127.0.0.1:0", "models": ups, "keys": keys[1:]})
        os.killpg(pid, signal.SIGHUP)
        assert wait_until(lambda: "reloaded" in (harness.tmp / "router.log").read_text(), 5)
        status, body = ask(sock, b"sk-a")
        assert status == 401 and error_of(body)["code"] == "invalid_api_key"
        assert ask(sock, b"sk-b")[0] == 200


def test_max_tokens_that_is_no_token_count_is_a_400_and_the_budget_holds(
        harness: Harness) -> None:
    up = harness.upstream()
    r = harness.router({"workers": 2, "models": [{"name": "m", "replicas": [replica("a", up)]}],
                        "keys": [{"name": "k", "hash": key_hash("sk-k"), "tpm": 1000}]})
    url, auth = f"http://127.0.0.1:{r.port}{CHAT}", {"Authorization": "Bearer sk-k"}
    for bad in (-1000, -9223372036854775808, 9223372036854775807, "12", 2.5):
        resp = httpx.post(url, headers=auth, json={"model": "m", "max_tokens": bad})
        assert resp.status_code == 400, (bad, resp.text)
        assert error_of(resp.content)["param"] == "max_tokens"
    answers: list[int] = []

    def slow() -> None:
        body = {"model": "m", "max_tokens": 400, "canned_delay": 1.0}
        answers.append(httpx.post(url, headers=auth, json=body, timeout=10).status_code)

    threads = [threading.Thread(target=slow) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(answers) == [200] * 2 + [429] * 8  # 1,000 tpm: two reservations of ~420


def test_negative_usage_from_a_replica_never_makes_counters_go_back(harness: Harness) -> None:
    up = harness.upstream()
    r = harness.router({"models": [{"name": "m", "replicas": [replica("a", up)]}]})
    url = f"http://127.0.0.1:{r.port}{CHAT}"
    assert httpx.post(url, json={"model": "m"}).status_code == 200

    def tokens() -> float:
        return metric(r.port, "modelstack_router_tokens_total", model="m")

    assert tokens() == 15
    for usage in ({"prompt_tokens": -100, "completion_tokens": -50, "total_tokens": -150},
                  {"prompt_tokens": 10, "total_tokens": -9223372036854775807}):
        assert httpx.post(url, json={"model": "m", "canned_usage": usage}).status_code == 200
    assert tokens() == 15 + 10


def test_protocol_errors_are_openai_shaped_and_wrong_methods_get_405(harness: Harness) -> None:
    port, _, _, _ = settled(harness, {"models": models(harness), "keys": [
        {"name": "k", "hash": key_hash("sk-k")}]})
    cases: list[tuple[bytes, int, str | None]] = [
        (b"HELLO THERE\r\n\r\n", 400, "malformed_request"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "url_too_long"),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "headers_too_large"),
        (b"POST /v1/models HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "method_not_allowed"),
        (b"GET /v1/chat/completions HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
        (b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer sk-k\r\n"
         b"Authorization: Bearer sk-other\r\n\r\n", 400, None),
    ]
    for raw, want, code in cases:
        with connect(port) as sock:
            sock.sendall(raw)
            status, headers, body = read_answer(sock)
        assert status == want, (raw[:40], status, body)
        assert headers["content-type"] == "application/json"
        assert error_of(body)["code"] == code
    assert headers_of(port, b"POST /v1/models")["allow"] == "GET"
    assert headers_of(port, b"PUT /v1/chat/completions")["allow"] == "POST"
    with connect(port) as sock:
        sock.sendall(cases[-1][0])
        assert error_of(read_answer(sock)[2])["param"] == "authorization"


def headers_of(port: int, request_line: bytes) -> dict[str, str]:
    with connect(port) as sock:
        sock.sendall(request_line + b" HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        return read_answer(sock)[1]


def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(harness: Harness) -> None:
    port, pid, _, socks = settled(harness, {"models": models(harness),
                                            "clients": {"keepalive_timeout": 0.5}})
    with connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: r\r\n\r\n")
        assert read_answer(sock)[0] == 200
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert 0.4 < time.monotonic() - started < 2
    assert wait_until(lambda: sockets(pid) <= socks, 2)
