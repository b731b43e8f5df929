"""The agent's API refuses bad requests with one JSON error shape and keeps serving.

A real `stack-agent` process (no backend needed: nothing here is ever started), one per
module; the two internal errors are provoked in-process, where a fault can be planted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_harness import TOKEN, Agent, running_agent

from agent.api import MAX_BODY_BYTES, create_app
from agent.config import AgentConfig, ensure_dirs
from agent.gpu_metrics import GpuReader
from agent.reconcile import Reconciler

CASES = sorted((Path(__file__).parent / "assignments").glob("*.json"))
REFUSED = [c for c in CASES if json.loads(c.read_text())["error"] is not None]
ROUTES = ("/v1/status", "/metrics", "/v1/instances/a-0/logs")
NODE = "api-node"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    yield from running_agent(tmp_path_factory.mktemp("api") / "prefix", NODE)


def error_of(response: httpx.Response, status: int) -> str:
    """The answer's message, after checking its status and the one error shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "hint"}, body
    assert body["error"] and body["hint"] and "Traceback" not in response.text
    return str(body["error"])


def one_instance(**extra: Any) -> dict[str, Any]:
    return {"format_version": 1, "node": NODE, "instances": [
        {"id": "a-0", "model": "a", "source": "/nowhere/a.gguf", "backend": "llama.cpp",
         "runtime_path": "/nowhere/runtime", "port": 40001, **extra}]}


def accepted(agent: Agent) -> None:
    """The agent still serves and still takes a valid assignment."""
    assert httpx.get(f"http://127.0.0.1:{agent.port}/healthz").json() == {"status": "ok"}
    response = agent.client.put("/v1/assignment", json=one_instance())
    assert response.json() == {"accepted": True, "instances": 1}


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, b"[" * 33 + b"]" * 33],
                         ids=["array-100000", "object-100000", "array-33"])
def test_deeply_nested_json_is_a_400_and_the_agent_keeps_serving(
        agent: Agent, body: bytes) -> None:
    message = error_of(agent.client.put("/v1/assignment", content=body), 400)
    assert message == "the assignment nests arrays and objects more than 32 deep"
    accepted(agent)


@pytest.mark.parametrize("case_file", REFUSED, ids=[c.stem for c in REFUSED])
def test_every_refused_assignment_case_is_refused_by_the_api_too(
        agent: Agent, case_file: Path) -> None:
    case = json.loads(case_file.read_text())
    accepted(agent)
    before = (agent.prefix / "state" / "assignment.json").read_text()
    data = case["assignment"]
    if isinstance(data, dict) and data.get("node") == case["node"]:
        data = {**data, "node": NODE}
    response = agent.client.put("/v1/assignment", content=json.dumps(data).encode())
    if "NaN" in case_file.read_text():  # not JSON: refused before the schema
        assert error_of(response, 400) == \
            "the assignment is not valid JSON: NaN is not a JSON value"
    else:
        assert case["error"].replace(f"`{case['node']}`", f"`{NODE}`") in error_of(response, 422)
    assert (agent.prefix / "state" / "assignment.json").read_text() == before


@pytest.mark.parametrize("body, message", [
    (b'{"format_version": 1, "node": "api-node", "instances": [], "node": "x"}',
     'key "node" appears twice in one object'),
    (b'{"format_version": 1e400}', "number 1e400 is out of range"),
    (b'{"format_version": -Infinity}', "-Infinity is not a JSON value"),
    (b'{"format_version": ' + b"9" * 5000 + b"}", "has more than 20 digits"),
    (b"\xff\xfe{", "can't decode"),
    (b"{not json", "Expecting property name"),
])
def test_what_json_loads_would_take_or_choke_on_is_a_400(
        agent: Agent, body: bytes, message: str) -> None:
    error = error_of(agent.client.put("/v1/assignment", content=body), 400)
    assert error.startswith("the assignment is not valid JSON: ") and message in error


def test_a_body_over_a_mebibyte_is_a_413_declared_or_streamed(agent: Agent) -> None:
    big = b" " * MAX_BODY_BYTES + b"{}"
    declared = agent.client.put("/v1/assignment", content=big)
    assert error_of(declared, 413) == f"the body is larger than {MAX_BODY_BYTES} bytes"

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for _ in range(3):
            yield b" " * (MAX_BODY_BYTES // 2)

    streamed = agent.client.put("/v1/assignment", content=chunks())
    assert "content-length" not in streamed.request.headers
    assert error_of(streamed, 413) == f"the body is larger than {MAX_BODY_BYTES} bytes"
    accepted(agent)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_that_says_it_is_not_json_is_a_415(agent: Agent, content_type: str) -> None:
    response = agent.client.put("/v1/assignment", content=json.dumps(one_instance()),
                                headers={"Content-Type": content_type})
    assert error_of(response, 415) == f"the assignment must be JSON, not `{content_type}`"


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8",
                                          "application/merge-patch+json"])
def test_json_types_and_no_type_are_read_as_json(agent: Agent, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = agent.client.put("/v1/assignment", content=json.dumps(one_instance()).encode(),
                                headers=headers)
    assert response.status_code == 200, response.text


def test_unknown_paths_are_404_and_wrong_methods_405_with_allow(agent: Agent) -> None:
    assert error_of(agent.client.get("/v2/status"), 404) == 'GET "/v2/status": Not Found'
    for method, path, allow in [("POST", "/v1/assignment", "PUT"),
                                ("GET", "/v1/assignment", "PUT"),
                                ("DELETE", "/v1/status", "GET"),
                                ("PUT", "/healthz", "GET")]:
        response = agent.client.request(method, path)
        assert error_of(response, 405) == f'{method} "{path}": Method Not Allowed'
        assert response.headers["allow"] == allow


def test_a_missing_or_wrong_token_is_a_json_401(agent: Agent) -> None:
    base = f"http://127.0.0.1:{agent.port}"
    for path in ROUTES:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN},
                        {"Authorization": "Basic " + TOKEN}):
            response = httpx.get(base + path, headers=headers)
            assert error_of(response, 401) == "missing or wrong bearer token"
            assert response.headers["www-authenticate"] == "Bearer"
    unread = httpx.put(base + "/v1/assignment", content=b"[" * 100_000)
    assert error_of(unread, 401) == "missing or wrong bearer token"  # token before body


def test_a_request_head_over_16_kib_is_refused_before_the_token_is_read(agent: Agent) -> None:
    # the HTTP server answers this itself (plain text): the request never reaches the API
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as conn:
        conn.sendall(b"GET /v1/status HTTP/1.1\r\nHost: agent\r\n")
        with contextlib.suppress(OSError):  # the server may close before all is sent
            for _ in range(200):
                conn.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        answer = conn.recv(200)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    accepted(agent)


@pytest.mark.parametrize("instance_id", ["a" * 10_000, "a%00b", "%2E%2E", ".hidden", "a%0Ab"])
def test_log_ids_that_cannot_be_file_names_are_404(agent: Agent, instance_id: str) -> None:
    response = agent.client.get(f"/v1/instances/{instance_id}/logs")
    assert error_of(response, 404).startswith("no log for instance ")
    assert agent.client.get("/v1/instances/a%2Fb/logs").status_code == 404  # a/b: no route


def test_a_bad_query_value_is_a_400(agent: Agent) -> None:
    for tail in ("x", "-1", "100001"):
        response = agent.client.get("/v1/instances/a-0/logs", params={"tail": tail})
        assert error_of(response, 400).startswith("the request is invalid: `tail`: ")


def test_the_agent_logged_no_traceback(agent: Agent) -> None:
    assert "Traceback" not in agent.output()


# ---- internal errors, in-process ---------------------------------------------------------

class LocalApp:
    """The API of a reconciler that does not run, called in-process (faults can be planted)."""

    def __init__(self, prefix: Path) -> None:
        cfg = AgentConfig(node=NODE, token_file=str(prefix / "token"), prefix=str(prefix))
        ensure_dirs(cfg)
        self.reconciler = Reconciler(cfg)
        self.app = create_app(self.reconciler, TOKEN, GpuReader())

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://agent",
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as c:
                return await c.request(method, path, **kwargs)
        return asyncio.run(call())


def test_an_unexpected_exception_is_a_json_500_naming_only_its_type(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = LocalApp(tmp_path)

    def broken() -> dict[str, Any]:
        raise RuntimeError("a detail for the log only: /secret/path")

    monkeypatch.setattr(local.reconciler, "status", broken)
    response = local.request("GET", "/v1/status")
    assert error_of(response, 500) == "internal error: RuntimeError"
    assert "/secret/path" not in response.text
    assert local.request("GET", "/healthz").status_code == 200


def test_an_assignment_that_cannot_be_written_is_a_json_500_with_the_reason(
        tmp_path: Path) -> None:
    local = LocalApp(tmp_path)
    cfg = local.reconciler.cfg
    cfg.state_dir.rename(cfg.state_dir.with_name("moved"))
    response = local.request("PUT", "/v1/assignment", json=one_instance())
    assert error_of(response, 500) == (f"the assignment could not be written to "
                                       f"{cfg.assignment_file}: No such file or directory")
