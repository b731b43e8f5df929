"""A real Prometheus (Debian's) loads the files `stack monitoring` writes and scrapes a live
loopback fleet serving Gemma; the instance-down alert goes pending when a backend hangs.

One loopback host, `stack apply` (Gemma on the catalogue's llama.cpp, the router there),
one chat request through the router, then `stack monitoring --write-tokens` with
`[monitoring] scrape_interval_seconds = 1` and a 1 s `instance_down_for_seconds`. The
Prometheus server runs on loopback with its own storage folder; the test asks its HTTP API
(`/api/v1/query`, `/api/v1/targets`, `/api/v1/alerts`) for the router's and the agent's
series, then SIGSTOPs the llama-server: its health checks time out, the agent marks the
instance unhealthy (it restarts a hung backend only after 120 s), and
`ModelstackInstanceDown` for that instance becomes pending or firing. Last, the backend is
killed with its binary moved aside, so the agent cannot start it again: the same alert.

About 150 s on 2 cores shared with other work (mostly the agent install and the model
load).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet, gemma_stack_toml, run_stack, stack_session

from stack.secrets import generate_key, hash_key
from tests.agent.agent_harness import free_port

pytestmark = pytest.mark.integration

STACK = "promtest"
MONITORING = """
[monitoring]
scrape_interval_seconds = 1
rate_window_seconds = 4
instance_down_for_seconds = 1

[agent]
probe_interval_seconds = 1
"""
# (PromQL, labels one of its series carries): what the live fleet must show through
# Prometheus, every value above 0: the router's, the agent's, and the engine series the
# agent reads from the llama-server it runs
SERIES: list[tuple[str, dict[str, str]]] = [
    ('up{job="modelstack-router"}', {"node": "node-01", "stack": STACK}),
    ('up{job="modelstack-agent"}', {"node": "node-01", "stack": STACK}),
    ('modelstack_router_requests_total{status="2xx"}', {"model": "gemma", "stack": STACK}),
    ('modelstack_router_tokens_total{type="completion"}', {"model": "gemma", "stack": STACK}),
    ('modelstack_instance_state{state="ready"}',
     {"model": "gemma", "instance": "gemma-0", "node": "node-01", "stack": STACK}),
    ("modelstack_engine_up",
     {"model": "gemma", "instance": "gemma-0", "node": "node-01", "backend": "llama.cpp"}),
    ("modelstack_engine_prompt_tokens_total", {"model": "gemma", "node": "node-01"}),
    ("modelstack_engine_generation_tokens_total", {"model": "gemma", "node": "node-01"}),
]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    """`check()`'s first truthy result, asked every 0.5 s; fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@contextlib.contextmanager
def prometheus(config: Path, storage: Path, log: Path) -> Iterator[str]:
    """A Prometheus server on a loopback port with `config`, until it is ready; its API."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing: scripts/setup installs it")
        pytest.skip("prometheus is missing (apt-get install prometheus, or scripts/setup)")
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={storage}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("Prometheus to start", lambda: proc.poll() is not None
                 or "Server is ready to receive web requests" in log.read_text())
        assert proc.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def api(base: str, path: str, **params: str) -> Any:
    """`data` of a Prometheus HTTP API answer."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{base}/api/v1/{path}{query}", timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def query(base: str, promql: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = api(base, "query", query=promql)["result"]
    return result


def alerts(base: str, name: str) -> list[dict[str, Any]]:
    return [a for a in api(base, "alerts")["alerts"] if a["labels"]["alertname"] == name]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("prom")
    fleet = Fleet(1, root=work / "fleet")
    fleet.start()
    key = generate_key()
    text, url = gemma_stack_toml(fleet, STACK, gguf_model, None, hash_key(key))
    (work / "stack.toml").write_text(text + MONITORING)
    with stack_session(fleet, work, "prometheus-secret-0123456789abcdef"):
        applied = run_stack("apply", "--auto-approve", cwd=work)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key=key, timeout=60, max_retries=0)
        reply = client.chat.completions.create(
            model="gemma", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
        assert reply.usage and reply.usage.completion_tokens > 0
        written = run_stack("monitoring", "--out", "monitoring", "--write-tokens", cwd=work)
        assert written.returncode == 0, written.stdout + written.stderr
        with prometheus(work / "monitoring" / "prometheus.yml", work / "tsdb",
                        work / "prometheus.log") as base:
            yield {"fleet": fleet, "dir": work, "prometheus": base}


def test_prometheus_scrapes_the_routers_and_agents_series(world: dict[str, Any]) -> None:
    base = world["prometheus"]

    def targets_up() -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = api(base, "targets")["activeTargets"]
        return targets if all(t["health"] == "up" for t in targets) else []

    targets = wait_for("every target scraped and up", targets_up)
    assert sorted(t["labels"]["job"] for t in targets) == ["modelstack-agent",
                                                           "modelstack-router"]
    for promql, labels in SERIES:
        series = wait_for(promql, functools.partial(query, base, promql))
        assert any(s["metric"].items() >= labels.items() for s in series), (promql, series)
        assert all(float(s["value"][1]) > 0 for s in series), (promql, series)
    rules = api(base, "rules")["groups"]
    assert [g["name"] for g in rules] == [f"modelstack-{STACK}"]
    assert not alerts(base, "ModelstackInstanceDown")  # everything is ready


def test_a_hung_backend_makes_the_instance_down_alert_pending(world: dict[str, Any]) -> None:
    base = world["prometheus"]
    status = world["fleet"].hosts["node-01"].prefix / "state" / "status.json"
    [instance] = json.loads(status.read_text())["instances"]
    pid = int(instance["pid"])
    assert b"llama-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    os.kill(pid, signal.SIGSTOP)  # its health checks time out; the agent waits 120 s
    try:
        found = wait_for("ModelstackInstanceDown", lambda: alerts(base, "ModelstackInstanceDown"))
        [alert] = found
        assert alert["state"] in ("pending", "firing")
        assert alert["labels"] == {
            "alertname": "ModelstackInstanceDown", "severity": "warning", "stack": STACK,
            "node": "node-01", "model": "gemma", "instance": "gemma-0"}
        assert alert["annotations"]["summary"] == \
            "Instance gemma-0 of gemma on node-01 is not ready"
        assert query(base, 'modelstack_instance_state{state="unhealthy"} == 1')
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_a_killed_backend_that_cannot_start_again_makes_the_instance_down_alert_pending(
        world: dict[str, Any]) -> None:
    """A backend killed for good (its binary gone, so the agent's restart fails) is down
    too; a killed backend that the agent restarts at once is not (it is `starting`, then
    `ready`: no alert for a crash the agent mended)."""
    base = world["prometheus"]
    prefix = world["fleet"].hosts["node-01"].prefix
    status = prefix / "state" / "status.json"

    def ready_pid() -> int | None:
        [instance] = json.loads(status.read_text())["instances"]
        return int(instance["pid"]) if instance["state"] == "ready" else None

    wait_for("no instance-down alert", lambda: not alerts(base, "ModelstackInstanceDown"), 240)
    pid = wait_for("the instance ready again", ready_pid, 240)
    binary = Path(os.readlink(f"/proc/{pid}/exe"))
    assert binary.is_relative_to(prefix), binary  # the host's own runtime folder
    aside = binary.with_name(binary.name + ".aside")
    binary.rename(aside)
    try:
        os.kill(pid, signal.SIGKILL)
        found = wait_for("ModelstackInstanceDown", lambda: alerts(base, "ModelstackInstanceDown"))
        [alert] = found
        assert alert["state"] in ("pending", "firing")
        assert alert["labels"]["instance"] == "gemma-0"
        assert query(base, 'modelstack_instance_state{state=~"crash-looping|failed"} == 1')
    finally:
        aside.rename(binary)
