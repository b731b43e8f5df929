"""The agent's connections (agent.http) against a real agent process: its own 400s are
JSON, a connection over the cap gets a JSON 503, a request that arrives too slowly gets a
JSON 408 and its socket back, and the agent answers normally through all of it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.agent.agent_harness import TOKEN, Agent, wait_for

TUNING = ("stop_grace_seconds = 3\nrequest_timeout_seconds = 1.5\nmax_connections = 8\n"
          "keep_alive_seconds = 30\n")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("conn"), tuning=TUNING, env={"HF_HUB_OFFLINE": "1"})
    a.start()
    yield a
    a.cleanup()


def _connect(agent: Agent) -> socket.socket:
    return socket.create_connection(("127.0.0.1", agent.port), timeout=5)


def _answer(sock: socket.socket) -> tuple[int, str, dict[str, str]]:
    """Status, content type and JSON body of the one response on a closing connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers["content-type"], json.loads(body)


def _healthy(agent: Agent) -> bool:
    return bool(agent.client.get("/healthz").status_code == 200)


@pytest.mark.parametrize("raw", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
])
def test_protocol_errors_are_answered_as_json(agent: Agent, raw: bytes) -> None:
    with _connect(agent) as sock:
        sock.sendall(raw)
        status, kind, body = _answer(sock)
    assert (status, kind) == (400, "application/json")
    assert body["error"] == "invalid HTTP request" and body["hint"]
    assert _healthy(agent)


def test_a_half_sent_request_gets_408_and_its_socket_is_closed(agent: Agent) -> None:
    with _connect(agent) as sock:
        sock.sendall(b"PUT /v1/assignment HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n{")
        started = time.monotonic()
        status, kind, body = _answer(sock)
        waited = time.monotonic() - started
    assert (status, kind) == (408, "application/json") and body["hint"]
    assert 1.0 < waited < 5
    assert _healthy(agent)


def test_a_head_sent_one_byte_at_a_time_is_cut_off_at_the_deadline(agent: Agent) -> None:
    with _connect(agent) as sock:
        started = time.monotonic()
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 50:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > 4:
                break
        if not closed:
            sock.settimeout(3)
            assert sock.recv(65536).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 5


def test_connections_over_the_cap_get_503_and_the_agent_recovers(agent: Agent) -> None:
    held = [_connect(agent) for _ in range(8)]
    try:
        time.sleep(0.2)
        with _connect(agent) as extra:
            status, kind, body = _answer(extra)
        assert (status, kind) == (503, "application/json")
        assert body["error"] == "too many open connections"
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: _healthy(agent), 10, "the agent after the held connections closed")


def test_idle_connections_are_closed_by_the_deadline_so_they_cannot_pile_up(
        agent: Agent) -> None:
    held = [_connect(agent) for _ in range(8)]
    try:
        for sock in held:  # each gets its 408 once the deadline passes, and is closed
            status, _, _ = _answer(sock)
            assert status == 408
    finally:
        for sock in held:
            sock.close()
    assert _healthy(agent)


def test_a_normal_request_still_works_on_a_kept_alive_connection(agent: Agent) -> None:
    with _connect(agent) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200")
            time.sleep(2)  # longer than the request deadline, between requests: fine


