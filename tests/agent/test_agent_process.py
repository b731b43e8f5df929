"""A real agent driving a real llama-server with Gemma 3 270M (about 25 s in all).

Each test starts `stack-agent` with a temporary prefix and a runtime folder whose
`bin/` links to the llama.cpp build (the documented RUNTIME/bin layout).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_harness import (
    AGENT,
    ROOT,
    Agent,
    free_port,
    group_alive,
    hf_cache_with,
    make_runtime,
    wait_for,
)
from openai import AuthenticationError, OpenAI

pytestmark = pytest.mark.integration


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    # offline: the hf:// source below is served from the cache the test fills
    a = Agent(tmp_path / "prefix", env={"HF_HUB_OFFLINE": "1"})
    yield a
    a.cleanup()


def gemma(runtime: Path, port: int, **extra: Any) -> dict[str, Any]:
    return {"id": "gemma-0", "model": "gemma", "source": "hf://test-org/gemma-gguf/gemma.gguf",
            "backend": "llama.cpp", "runtime_path": str(runtime), "port": port,
            "api_key": "sk-instance-key", "context": 512, "args": ["-t", "2"], **extra}


def chat(port: int, key: str = "sk-instance-key") -> str:
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=60)
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
    return reply.choices[0].message.content or ""


def start_gemma(agent: Agent, llama_bin: Path, gguf_model: Path) -> tuple[int, dict[str, Any]]:
    runtime = make_runtime(agent.prefix, llama_bin)
    hf_cache_with(agent.prefix, "test-org/gemma-gguf", "gemma.gguf", gguf_model)
    agent.start()
    port = free_port()
    response = agent.assign([gemma(runtime, port)])
    assert response.status_code == 200, response.text
    return port, agent.wait_state("gemma-0", "ready")


def test_backend_answers_and_a_killed_backend_is_replaced(
        agent: Agent, llama_bin: Path, gguf_model: Path) -> None:
    port, inst = start_gemma(agent, llama_bin, gguf_model)
    assert inst["spec_hash"] and inst["restarts"] == 0
    assert chat(port)
    with pytest.raises(AuthenticationError):
        chat(port, key="wrong")  # the backend requires the per-instance key

    killed_at = time.monotonic()
    os.kill(inst["pid"], signal.SIGKILL)
    new: dict[str, Any] = {}

    def replaced() -> bool:
        nonlocal new
        new = agent.instance("gemma-0") or {}
        return new.get("pid") not in (None, inst["pid"])

    wait_for(replaced, 5, "a new backend pid")
    restart_s = time.monotonic() - killed_at
    ready = agent.wait_state("gemma-0", "ready")
    assert ready["restarts"] == 1
    assert chat(port)
    print(f"\nkill -9 -> new backend started in {restart_s:.2f} s")
    assert restart_s < 2.0


def test_restarted_agent_adopts_the_running_backend(
        agent: Agent, llama_bin: Path, gguf_model: Path) -> None:
    port, inst = start_gemma(agent, llama_bin, gguf_model)
    agent.stop()
    assert group_alive(inst["pid"]), "the backend must outlive the agent"
    out = subprocess.run([*AGENT, "status", "--json", "--config", str(agent.config)],
                         env=agent.env, capture_output=True, text=True, check=True)
    offline = json.loads(out.stdout)
    assert offline["running"] is False
    assert [(i["id"], i["pid"]) for i in offline["instances"]] == [("gemma-0", inst["pid"])]

    agent.start()
    adopted = agent.wait_state("gemma-0", "ready")
    assert adopted["pid"] == inst["pid"] and adopted["adopted"] is True
    assert adopted["spec_hash"] == inst["spec_hash"]
    assert chat(port)


def test_removed_instance_stops_and_leaves_no_process(
        agent: Agent, llama_bin: Path, gguf_model: Path) -> None:
    _port, inst = start_gemma(agent, llama_bin, gguf_model)
    assert agent.assign([]).status_code == 200
    wait_for(lambda: agent.instance("gemma-0") is None, 10, "gemma-0 gone from status")
    assert group_alive(inst["pid"]) == []
    assert not (agent.prefix / "state" / "instances" / "gemma-0.json").exists()
    assert not (agent.prefix / "state" / "instances" / "gemma-0.key").exists()


def test_bad_assignment_is_rejected_and_running_instance_stays(
        agent: Agent, llama_bin: Path, gguf_model: Path) -> None:
    port, inst = start_gemma(agent, llama_bin, gguf_model)
    before = (agent.prefix / "state" / "assignment.json").read_text()
    newer = agent.client.put("/v1/assignment", json={"format_version": 2, "node": agent.node})
    assert newer.status_code == 422
    assert "`format_version` 2 is not supported" in newer.json()["error"]
    broken = agent.client.put("/v1/assignment", content=b"{not json")
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    missing = agent.assign([{"id": "x", "model": "m"}])
    assert missing.status_code == 422 and "`instances.0.backend`" in missing.json()["error"]
    other = agent.client.put("/v1/assignment", json={"format_version": 1, "node": "elsewhere"})
    assert other.status_code == 422 and "`elsewhere`" in other.json()["error"]
    time.sleep(1.5)
    assert (agent.prefix / "state" / "assignment.json").read_text() == before
    now = agent.instance("gemma-0")
    assert now is not None and now["pid"] == inst["pid"] and now["state"] == "ready"
    assert chat(port)


def test_bad_instances_fail_with_hints_and_the_agent_keeps_running(
        agent: Agent, llama_bin: Path, gguf_model: Path, tmp_path: Path) -> None:
    runtime = make_runtime(agent.prefix, llama_bin)
    agent.start()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    base = {"model": "m", "backend": "llama.cpp", "runtime_path": str(runtime)}
    try:
        response = agent.assign([
            {**base, "id": "port-taken", "source": str(gguf_model), "port": busy_port},
            {**base, "id": "no-runtime", "source": str(gguf_model), "port": free_port(),
             "runtime_path": str(tmp_path / "nowhere")},
            {**base, "id": "no-model", "source": str(tmp_path / "missing.gguf"),
             "port": free_port()},
            {**base, "id": "no-download", "source": "hf://nobody/nothing/x.gguf",
             "port": free_port()},
            {**base, "id": "no-modelscope", "source": "modelscope://org/name",
             "port": free_port()},
        ])
        assert response.status_code == 200
        expected = {
            "port-taken": f"port {busy_port} on 127.0.0.1 is already in use",
            "no-runtime": "runtime binary",
            "no-model": "does not exist on this host. hint:",
            "no-download": "download of hf://nobody/nothing failed",
            "no-modelscope": "`modelscope` library is not installed",
        }
        for iid, text in expected.items():
            inst = agent.wait_state(iid, "failed", timeout=30)
            assert text in inst["last_error"] and "hint:" in inst["last_error"], inst
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        busy.close()
    # the port is free again: the next passes start the instance (level-based)
    agent.wait_state("port-taken", "ready", timeout=30)


def test_api_needs_the_token_and_serves_logs_and_metrics(
        agent: Agent, llama_bin: Path, gguf_model: Path) -> None:
    _port, _inst = start_gemma(agent, llama_bin, gguf_model)
    base = f"http://127.0.0.1:{agent.port}"
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    for path in ("/v1/status", "/metrics", "/v1/instances/gemma-0/logs"):
        assert httpx.get(base + path).status_code == 401
        assert httpx.get(base + path, headers={"Authorization": "Bearer nope"}).status_code == 401
    logs = agent.client.get("/v1/instances/gemma-0/logs", params={"tail": 5})
    assert logs.status_code == 200 and 0 < len(logs.text.splitlines()) <= 5
    assert agent.client.get("/v1/instances/nope/logs").status_code == 404
    metrics = agent.client.get("/metrics").text
    assert 'modelstack_instance_state{node="test-node",instance="gemma-0",model="gemma",' \
           'state="ready"} 1' in metrics
    assert 'modelstack_instance_restarts_total{node="test-node",instance="gemma-0"' in metrics
    assert 'modelstack_gpu_metrics_available{node="test-node",source="unavailable"} 0' in metrics
    status = agent.status()
    assert status["gpu_source"] == "unavailable" and status["gpus"] == []
    assert "sk-instance-key" not in metrics + json.dumps(status) + agent.output()


def test_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    a = Agent(tmp_path / "prefix")
    token = tmp_path / "prefix" / "etc" / "agent.token"
    token.chmod(0o644)
    out = subprocess.run([*AGENT, "--config", str(a.config)], env=a.env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1
    assert f"`token_file` {token} has mode 0644" in out.stderr
    assert f"hint: run `chmod 600 {token}`" in out.stderr


def test_distributed_rpc_worker_and_main_answer(
        agent: Agent, llama_bin: Path, gguf_model: Path) -> None:
    runtime = make_runtime(agent.prefix, llama_bin)
    agent.start()
    worker_port, main_port = free_port(), free_port()
    common = {"model": "gemma", "source": str(gguf_model), "backend": "llama.cpp",
              "runtime_path": str(runtime)}
    response = agent.assign([
        {**common, "id": "gemma-d-w1", "role": "worker", "port": worker_port,
         "args": ["-t", "2"], "peers": [{"node": agent.node, "host": "127.0.0.1",
                                         "port": main_port}]},
        # the scheduler's split of Gemma 3 270M's 18 layers: 6 stay on this CPU, 12 go to
        # the RPC worker (-ngl 13 --tensor-split 13: the output layer goes with them)
        {**common, "id": "gemma-d", "role": "main", "port": main_port, "context": 512,
         "api_key": "sk-instance-key", "args": ["-t", "1", "-lv", "4"], "layer_split": [6, 12],
         "peers": [{"node": agent.node, "host": "127.0.0.1", "port": worker_port}]},
    ])
    assert response.status_code == 200, response.text
    agent.wait_state("gemma-d-w1", "ready")
    main = agent.wait_state("gemma-d", "ready", timeout=90)
    cmdline = Path(f"/proc/{main['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"--rpc" in cmdline and f"127.0.0.1:{worker_port}".encode() in cmdline
    assert cmdline[cmdline.index(b"--tensor-split") + 1] == b"13"
    assert cmdline[cmdline.index(b"-ngl") + 1] == b"13"
    # llama-server took it (`-lv 4` logs the loader): 12 repeating layers + the output
    # layer on the RPC device, 6 layers on this CPU
    log = (agent.prefix / "logs" / "gemma-d.log").read_text(errors="replace")
    assert "offloading 12 repeating layers" in log and "offloaded 13/19 layers" in log, \
        log[-3000:]
    assert re.search(rf"RPC\d*\[127\.0\.0\.1:{worker_port}\] model buffer size", log), \
        log[-3000:]
    assert agent.instance("gemma-d")["layer_split"] == [6, 12]  # reported for sticky plans
    assert chat(main_port)


def test_status_command_without_any_agent(tmp_path: Path) -> None:
    a = Agent(tmp_path / "prefix")
    out = subprocess.run([sys.executable, "-m", "agent.main", "status", "--json", "--config",
                          str(a.config)], env=a.env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    body = json.loads(out.stdout)
    assert body["running"] is False and body["node"] == "test-node"
    assert body["instances"] == []


def test_agent_started_on_a_broken_assignment_file_touches_nothing_then_adopts(
        agent: Agent, llama_bin: Path, gguf_model: Path) -> None:
    port, inst = start_gemma(agent, llama_bin, gguf_model)
    good = json.loads((agent.prefix / "state" / "assignment.json").read_text())
    agent.stop()
    (agent.prefix / "state" / "assignment.json").write_text("{broken")
    agent.start()
    wait_for(lambda: agent.status()["assignment_error"] is not None, 5, "assignment_error")
    time.sleep(1.5)
    assert group_alive(inst["pid"]) and agent.status()["instances"] == []
    assert agent.client.put("/v1/assignment", json=good).status_code == 200
    adopted = agent.wait_state("gemma-0", "ready")
    assert adopted["pid"] == inst["pid"] and adopted["adopted"] is True
    assert agent.status()["assignment_error"] is None
    assert chat(port)
