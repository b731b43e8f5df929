"""The Grafana dashboard: valid, on the `${DS_PROMETHEUS}` data source, and every metric its
PromQL uses is one a real `stack-router` or `stack-agent` exports.

The exported names come from the `/metrics` pages of real processes started here: a
router with one canned replica (after one request through it) and an agent with an empty
assignment. Together about 3 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "templates" / "grafana-dashboard.json"
CANNED = ROOT / "bench" / "router" / "canned_upstream.py"
DS = "${DS_PROMETHEUS}"
# series Prometheus makes itself for every target (not exported by our processes)
PROMETHEUS_SERIES = {"up"}
# what the dashboard must show (issue 6)
REQUIRED = {
    "modelstack_router_requests_total", "modelstack_router_request_duration_seconds_bucket",
    "modelstack_router_time_to_first_token_seconds_bucket", "modelstack_router_tokens_total",
    "modelstack_router_replica_in_flight", "modelstack_router_replica_up",
    "modelstack_router_retries_total", "modelstack_router_rate_limited_total",
    "modelstack_gpu_utilization_percent", "modelstack_gpu_memory_used_bytes",
    "modelstack_gpu_temperature_celsius", "modelstack_gpu_power_watts",
    "modelstack_instance_state", "modelstack_instance_restarts_total",
} | {  # the Engines row (issue 16)
    "modelstack_engine_up", "modelstack_engine_requests_running",
    "modelstack_engine_requests_waiting", "modelstack_engine_kv_cache_usage_ratio",
    "modelstack_engine_prompt_tokens_total", "modelstack_engine_generation_tokens_total",
    "modelstack_engine_time_to_first_token_seconds_bucket",
}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}


# ---------------------------------------------------------------------------- PromQL


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)            # strings
    text = re.sub(r"\{[^{}]*\}", " ", text)                     # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                     # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end():].lstrip()
        if not following.startswith("(") and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names


def test_metric_names_parser() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model",'
            'x="by(y)"}[$__rate_interval]))) / on(node) group_left b_total offset 5m')
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names('x_total{a="1"} / 2 > bool 0.5 or vector(1)') == {"x_total"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in data["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def expressions(data: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(data) for t in p.get("targets", [])]
    for var in data["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert match, query
            exprs.append(match.group(1))
    return exprs


# ---------------------------------------------------------------------------- structure


def test_dashboard_is_grafana_json_on_the_prometheus_data_source_variable() -> None:
    data = dashboard()
    assert data["title"] and data["uid"] and isinstance(data["schemaVersion"], int)
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(data)]
    assert len(ids) == len(set(ids))
    for panel in panels(data):
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DS}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": DS}
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": DS}


def test_dashboard_shows_every_required_metric() -> None:
    used = set().union(*(metric_names(e) for e in expressions(dashboard())))
    assert used >= REQUIRED, REQUIRED - used


# ---------------------------------------------------------------------------- real /metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(url: str, token: str | None = None, body: bytes | None = None) -> bytes:
    request = urllib.request.Request(url, data=body)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        data: bytes = response.read()
        return data


@contextlib.contextmanager
def process(argv: list[str], log: Path, ready: str, env: dict[str, str] | None = None
            ) -> Iterator[re.Match[str]]:
    """A process in its own group, until `ready` appears in its output; killed at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 30
        while True:
            match = re.search(ready, log.read_text(errors="replace"))
            if match:
                break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield match
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def exported(text: str) -> set[str]:
    """Series names of a Prometheus text page: `# TYPE` lines (histograms expanded)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" \
            else {name}
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples <= names, samples - names  # every sample is declared
    return names


@pytest.fixture(scope="module")
def router_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    tmp = tmp_path_factory.mktemp("router")
    with process([sys.executable, str(CANNED), "--port", "0"], tmp / "canned.log",
                 r"canned: listening on (\d+)") as canned:
        config = {"listen": "127.0.0.1:0", "models": [{"name": "gemma", "replicas": [
            {"id": "gemma-0", "url": f"http://127.0.0.1:{canned.group(1)}"}]}]}
        (tmp / "router.json").write_text(json.dumps(config))
        with process([sys.executable, "-m", "router.main", "--config", str(tmp / "router.json")],
                     tmp / "router.log", r"listening on http://127\.0\.0\.1:(\d+)") as router:
            base = f"http://127.0.0.1:{router.group(1)}"
            body = {"model": "gemma", "messages": [{"role": "user", "content": "hi"}]}
            http(f"{base}/v1/chat/completions", body=json.dumps(body).encode())
            text = http(f"{base}/metrics").decode()
    assert 'modelstack_router_tokens_total{model="gemma",key="_anonymous",type="prompt"}' in text
    return exported(text)


@pytest.fixture(scope="module")
def agent_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    prefix = tmp_path_factory.mktemp("agent")
    token = prefix / "agent.token"
    token.write_text("dashboard-test-token\n")
    token.chmod(0o600)
    port = free_port()
    config = prefix / "agent.toml"
    config.write_text(f'node = "n1"\nlisten = "127.0.0.1:{port}"\n'
                      f'token_file = "{token}"\nprefix = "{prefix}"\n')
    argv = [sys.executable, "-c", "import sys; from agent.main import main; sys.exit(main())",
            "--config", str(config)]
    with process(argv, prefix / "agent.log", r"agent \S+ listening on",
                 env={"PYTHONPATH": str(ROOT)}):
        deadline = time.monotonic() + 20
        while True:
            try:
                text = http(f"http://127.0.0.1:{port}/metrics", "dashboard-test-token").decode()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    assert 'modelstack_agent_up{node="n1"} 1' in text
    return exported(text)


def test_every_metric_the_dashboard_queries_is_exported_by_the_router_or_the_agent(
        router_metrics: set[str], agent_metrics: set[str]) -> None:
    assert "modelstack_router_request_duration_seconds_bucket" in router_metrics
    assert "modelstack_gpu_utilization_percent" in agent_metrics
    known = router_metrics | agent_metrics | PROMETHEUS_SERIES
    for expr in expressions(dashboard()):
        unknown = metric_names(expr) - known
        assert not unknown, f"{sorted(unknown)} in `{expr}` is exported by neither process"


def test_every_metric_the_alerts_query_is_exported_by_the_router_or_the_agent(
        router_metrics: set[str], agent_metrics: set[str]) -> None:
    from stack.alerts import alert_rules
    from stack.config import load_text

    known = router_metrics | agent_metrics | PROMETHEUS_SERIES
    for rule in alert_rules(load_text("")):
        unknown = metric_names(rule.expr) - known
        assert not unknown, f"{sorted(unknown)} in {rule.name} is exported by neither process"


def test_engine_panels_are_filtered_by_the_dashboards_variables() -> None:
    engine = [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])
              if "modelstack_engine_" in t["expr"]]
    assert len(engine) >= 7
    for expr in engine:
        for variable in ("stack", "node", "model"):
            assert f'{variable}=~"${variable}"' in expr, expr
