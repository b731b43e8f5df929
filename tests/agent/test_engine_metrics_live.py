"""Engine metrics from a real llama-server (Gemma 3 270M) through a real agent: after a
chat completion the agent's /metrics and /v1/status show the engine's token counts; a
backend that stops answering (SIGSTOP) is `modelstack_engine_up` 0; an instance that no
longer serves has no engine series."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import Agent, free_port, make_runtime, wait_for
from openai import OpenAI

pytestmark = pytest.mark.integration

LABELS = 'node="test-node",model="gemma",instance="gemma-0",backend="llama.cpp"'


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    # a hung backend is only reported here, never killed, so it stays hung for the test
    a = Agent(tmp_path / "prefix", tuning="stop_grace_seconds = 3\n"
              "restart_unhealthy_after_seconds = 0\n")
    yield a
    a.cleanup()


def engine_series(agent: Agent) -> dict[str, float]:
    """The agent's engine series of gemma-0: name -> value."""
    text = agent.client.get("/metrics").text
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(modelstack_engine_\w+)\{" + re.escape(LABELS) + r"\} (\S+)", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def test_engine_metrics_of_a_real_llama_server(agent: Agent, llama_bin: Path,
                                               gguf_model: Path) -> None:
    runtime = make_runtime(agent.prefix, llama_bin)
    agent.start()
    port = free_port()
    response = agent.assign([{
        "id": "gemma-0", "model": "gemma", "source": str(gguf_model), "backend": "llama.cpp",
        "runtime_path": str(runtime), "port": port, "api_key": "sk-instance-key",
        "context": 512, "args": ["-t", "2"]}])
    assert response.status_code == 200, response.text
    pid = agent.wait_state("gemma-0", "ready")["pid"]
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-instance-key",
                    timeout=60)
    client.chat.completions.create(model="gemma", max_tokens=4,
                                   messages=[{"role": "user", "content": "Say hi"}])

    # the scrape is kept 2 s: wait for one made after the request
    wait_for(lambda: engine_series(agent).get("modelstack_engine_prompt_tokens_total", 0) > 0,
             30, "prompt tokens in the agent's /metrics")
    series = engine_series(agent)
    assert series["modelstack_engine_up"] == 1
    assert series["modelstack_engine_generation_tokens_total"] > 0
    assert series["modelstack_engine_requests_running"] == 0
    assert series["modelstack_engine_requests_waiting"] == 0
    # llama-server has neither: left out, not written as 0
    assert "modelstack_engine_kv_cache_usage_ratio" not in series
    assert not [line for line in agent.client.get("/metrics").text.splitlines()
                if line.startswith("modelstack_engine_time_to_first_token")]
    engine = agent.instance("gemma-0")["engine"]  # type: ignore[index]
    assert engine["backend"] == "llama.cpp" and engine["up"] is True
    assert engine["prompt_tokens_total"] > 0 and engine["kv_cache_usage_ratio"] is None
    assert "sk-instance-key" not in agent.client.get("/metrics").text + agent.output()

    # a hung backend: its port takes the connection, nothing answers; the 2 s timeout
    # fails the scrape while the agent still counts it as serving
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: engine_series(agent).get("modelstack_engine_up") == 0, 60,
                 "engine_up 0 for a stopped backend")
        assert set(engine_series(agent)) == {"modelstack_engine_up"}
        engine = agent.instance("gemma-0")["engine"]  # type: ignore[index]
        assert engine["up"] is False and engine["prompt_tokens_total"] is None
        assert "cannot be read: no answer within 2 s" in agent.output()
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: engine_series(agent).get("modelstack_engine_up") == 1, 60,
             "engine_up 1 once the backend answers again")

    # killed, and its binary gone so it cannot come back: it no longer serves, and its
    # engine series go away with it (its state says why)
    (runtime / "bin" / "llama-server").unlink()
    os.kill(pid, signal.SIGKILL)
    agent.wait_state("gemma-0", "failed", 60)
    assert engine_series(agent) == {}
    assert "engine" not in agent.instance("gemma-0")  # type: ignore[operator]
