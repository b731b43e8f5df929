"""Fuzzing the assignment API of a real `stack-agent` process (hypothesis, derandomized).

Bodies are valid assignments (the data cases in `assignments/` and the instances of the
command cases in `commands/`) with one or two values replaced, removed or added, then
arbitrary JSON, then arbitrary bytes. For each, the agent must answer 2xx exactly when
the body is JSON of a schema-valid assignment, and then the assignment must be one that
can run (`assert_runnable` says what that means without asking the schema); any other
body gets a 4xx with the JSON error shape. Never a 5xx or a traceback, and the agent
keeps serving. Backends never start: every source and runtime is missing, and one
mutation cannot supply both.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from agent_harness import TOKEN, Agent, running_agent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import MAX_BODY_BYTES
from agent.errors import AgentError
from agent.json_input import decode_json
from agent.reconcile import parse_assignment

HERE = Path(__file__).parent
NODE = "fuzz-node"
EXAMPLES = {"mutated": 700, "json": 250, "bytes": 250, "routes": 300}
SETTINGS = {"derandomize": True, "database": None, "deadline": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def _valid_bases() -> list[dict[str, Any]]:
    """Valid assignments for NODE whose backends can never start."""
    instances: list[dict[str, Any]] = []
    for case_file in sorted((HERE / "commands").glob("*.json")):
        instances.append(json.loads(case_file.read_text())["instance"])
    bases: list[dict[str, Any]] = []
    for case_file in sorted((HERE / "assignments").glob("*.json")):
        case = json.loads(case_file.read_text())
        if case["error"] is None:
            bases.append({**case["assignment"], "node": NODE})
    for k, inst in enumerate(instances):
        bases.append({"format_version": 1, "node": NODE, "instances": [
            {**inst, "port": 41000 + k}, {**instances[(k + 1) % len(instances)],
                                         "id": "second-0", "port": 42000 + k}]})
    for base in bases:
        for inst in base["instances"]:
            inst.update(source="/nowhere/model", model_path=None, runtime_path="/nowhere/rt")
            if inst.get("command"):
                inst["command"] = "missing-server --port {port}"
    return bases


BASES = _valid_bases()

# values that have broken agents: wrong types, out of range, too long, not text
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 5, 65535, 65536, 2**31, 2**63, -(2**63), 10**19, 0.5, 1.0,
    5.0, -0.0, 1e-300, 1e308, math.nan, math.inf, -math.inf, "", " ", "a" * 10_000,
    "a\x00b", "a\nb", "\x7f", "\x85", "\ud800", "A=B", "../etc", "/", ".", "..", "-rf",
    "$(touch /tmp/x)", "ü", "1", "true", [], {}, [0], [-1], [True], [1, 1], {"A=B": "x"},
    {"": ""}, [[[[[]]]]], {"node": "x", "host": "h", "port": 0}, ["--a", "b\x00"],
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
VALUES = st.one_of(st.sampled_from(HOSTILE), JSON, st.text(), st.integers(-2**70, 2**70))
KEYS = st.one_of(st.sampled_from(["id", "port", "env", "gpus", "format_version", "extra",
                                  "indices", "A=B", "\x00", ""]), st.text(max_size=10))


def _places(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into the document: the root, each key of an object, each list item."""
    yield path
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _places(value, (*path, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _places(value, (*path, index))


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


@st.composite
def mutated_assignments(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(list(_places(doc))))
        action = draw(st.sampled_from(["replace", "replace", "remove", "add", "grow"]))
        if not path:
            doc = draw(VALUES) if action == "replace" else doc
            continue
        parent, last = _at(doc, path[:-1]), path[-1]
        if action == "replace":
            parent[last] = draw(VALUES)
        elif action == "remove":
            del parent[last]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
        elif action == "grow" and isinstance(parent[last], str):
            parent[last] += draw(st.sampled_from(["\x00", "\n", "\ud800", "=", "/..", "a" * 300]))
        elif action == "grow" and isinstance(parent[last], list):
            parent[last].append(draw(VALUES))
    return doc


def assert_runnable(doc: dict[str, Any]) -> None:
    """What an accepted assignment must be, said without the schema: the agent can
    run it without a file name too long, an exec that fails or a bad device."""
    name = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

    def integer(value: Any, low: int, high: int) -> bool:
        return type(value) is int and low <= value <= high

    def text(value: Any, allowed: str = "") -> bool:
        return isinstance(value, str) and all(
            c in allowed or not (ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f
                                 or 0xD800 <= ord(c) <= 0xDFFF) for c in value)

    assert doc["format_version"] == 1 and type(doc["format_version"]) is int
    assert doc["node"] == NODE
    instances = doc.get("instances", [])
    ids = [inst["id"] for inst in instances]
    assert len(ids) == len(set(ids))
    for inst in instances:
        assert name.fullmatch(inst["id"]) and len(inst["id"]) <= 128
        assert integer(inst["port"], 1, 65535)
        assert all(integer(p["port"], 1, 65535) for p in inst.get("peers", []))
        indices = inst.get("devices", {}).get("indices", [])
        assert all(integer(i, 0, 65535) for i in indices) and len(set(indices)) == len(indices)
        fraction = inst.get("gpu_memory_utilization")
        assert fraction is None or (type(fraction) in (int, float) and math.isfinite(fraction)
                                    and 0 < fraction <= 1)
        assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) and text(v)
                   for k, v in inst.get("env", {}).items())
        assert all(text(arg) for arg in inst.get("args", []))
        for key in ("model", "source", "model_path", "runtime_path", "mmproj", "api_key",
                    "host", "health_path", "backend", "kind"):
            assert inst.get(key) is None or text(inst[key])
        assert inst.get("command") is None or text(inst["command"], "\t\n\r")
        assert inst.get("model_path") is None or inst["model_path"].startswith("/")
        for key in ("replica", "context"):
            assert inst.get(key) is None or integer(inst[key], 0, 2**31 - 1)
        assert all(integer(n, 0, 2**31 - 1) for n in inst.get("layer_split") or [])


def schema_valid(body: bytes) -> dict[str, Any] | None:
    """The assignment in `body` if the agent's own rules take it, else None."""
    try:
        data = decode_json(body)
        parse_assignment(data, NODE)
    except AgentError:
        return None
    return dict(data)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    yield from running_agent(tmp_path_factory.mktemp("fuzz") / "prefix", NODE)


@pytest.fixture(scope="module")
def anonymous(agent: Agent) -> Iterator[httpx.Client]:
    """A client without the token (the test sets its own header, or none)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{agent.port}", timeout=10,
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        yield client


def check_answer(agent: Agent, body: bytes, content_type: str | None = "application/json"
                 ) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = agent.client.put("/v1/assignment", content=body, headers=headers)
    valid = schema_valid(body)
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    payload = response.json()
    if response.is_success:
        assert valid is not None, f"accepted an assignment the schema refuses: {body[:300]!r}"
        assert payload == {"accepted": True, "instances": len(valid.get("instances", []))}
        assert_runnable(valid)
    else:
        refused_unread = 415 if content_type else 0, 413 if len(body) > MAX_BODY_BYTES else 0
        assert valid is None or response.status_code in refused_unread, payload
        assert response.status_code in (400, 413, 415, 422), payload
        assert set(payload) == {"error", "hint"} and payload["error"] and payload["hint"]
    alive = agent.client.get("/healthz")
    assert alive.json() == {"status": "ok"} and agent.proc and agent.proc.poll() is None


def encode(doc: Any) -> bytes:
    # NaN and Infinity written as Python writes them, lone surrogates as \\u escapes
    return json.dumps(doc, allow_nan=True).encode()


@settings(max_examples=EXAMPLES["mutated"], **SETTINGS)  # type: ignore[arg-type]
@given(doc=mutated_assignments(),
       content_type=st.sampled_from(["application/json"] * 6 + [
           None, "application/json; charset=utf-8", "text/plain", "application/x+json"]))
def test_fuzz_mutated_assignments(agent: Agent, doc: Any, content_type: str | None) -> None:
    check_answer(agent, encode(doc), content_type)


@settings(max_examples=EXAMPLES["json"], **SETTINGS)  # type: ignore[arg-type]
@given(doc=JSON | st.fixed_dictionaries({"format_version": VALUES, "node": VALUES,
                                         "instances": st.lists(JSON, max_size=3)}))
def test_fuzz_arbitrary_json(agent: Agent, doc: Any) -> None:
    check_answer(agent, encode(doc))


@settings(max_examples=EXAMPLES["bytes"], **SETTINGS)  # type: ignore[arg-type]
@given(body=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda base, cut: encode(base)[:cut], st.sampled_from(BASES), st.integers(0, 400)),
    st.builds(lambda opener, depth: opener * depth,
              st.sampled_from([b"[", b'{"a":', b'[{"a":']), st.integers(1, 200_000)),
    st.builds(lambda base, at, junk: encode(base)[:at] + junk + encode(base)[at:],
              st.sampled_from(BASES), st.integers(0, 400), st.binary(min_size=1, max_size=8)),
))
def test_fuzz_arbitrary_bytes(agent: Agent, body: bytes) -> None:
    check_answer(agent, body)


@settings(max_examples=EXAMPLES["routes"], **SETTINGS)  # type: ignore[arg-type]
@given(method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.one_of(
           st.sampled_from(["/healthz", "/v1/status", "/v1/assignment", "/metrics", "/",
                            "/v1/instances/a-0/logs", "/v1/instances//logs"]),
           st.builds("/v1/instances/{}/logs".format,
                     st.text(st.characters(codec="utf-8"), max_size=300).map(
                         lambda t: quote(t, safe=""))),
           st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=40).map(
               lambda t: "/" + t.replace("?", "").replace("#", ""))),
       tail=st.one_of(st.none(), st.text(max_size=12), st.integers(-10, 200_000).map(str)),
       token=st.sampled_from([TOKEN, TOKEN, None, "wrong", TOKEN + "x"]))
def test_fuzz_routes(agent: Agent, anonymous: httpx.Client, method: str, path: str,
                     tail: str | None, token: str | None) -> None:
    params = {"tail": tail} if tail is not None else {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = anonymous.request(method, path, params=params, headers=headers)
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and method != "HEAD":
        payload = response.json()
        assert set(payload) == {"error", "hint"} and payload["error"], payload
    if response.status_code == 405:
        assert response.headers["allow"]
    assert agent.proc and agent.proc.poll() is None


def test_every_base_is_valid_and_runnable() -> None:
    assert len(BASES) > 20
    for base in BASES:
        assert schema_valid(encode(base)) == base
        assert_runnable(base)


def test_fuzzing_left_no_traceback_in_the_agent_log(agent: Agent) -> None:
    output = agent.output()
    assert "Traceback" not in output and "Exception in ASGI application" not in output
