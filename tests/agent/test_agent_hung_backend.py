"""A backend that is alive but stops answering (hung) is killed and restarted."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_harness import Agent, free_port, hf_cache_with, make_runtime, wait_for
from test_agent_process import chat, gemma

FAST = ("stop_grace_seconds = 3\nprobe_interval_seconds = 0.5\n"
        "unhealthy_after_failures = 2\nrestart_unhealthy_after_seconds = 2\n")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path / "prefix", env={"HF_HUB_OFFLINE": "1"}, tuning=FAST)
    yield a
    a.cleanup()


def test_a_hung_backend_is_reported_unhealthy_then_restarted(
        agent: Agent, llama_bin: Path, gguf_model: Path) -> None:
    runtime = make_runtime(agent.prefix, llama_bin)
    hf_cache_with(agent.prefix, "test-org/gemma-gguf", "gemma.gguf", gguf_model)
    agent.start()
    port = free_port()
    assert agent.assign([gemma(runtime, port)]).status_code == 200
    first = agent.wait_state("gemma-0", "ready")

    os.kill(first["pid"], signal.SIGSTOP)  # alive, but answers nothing
    stopped_at = time.monotonic()
    seen: dict[str, Any] = {}

    def unhealthy() -> bool:
        seen.update(agent.instance("gemma-0") or {})
        return seen.get("state") == "unhealthy"

    wait_for(unhealthy, 10, "the hung backend reported unhealthy")
    assert seen["pid"] == first["pid"]
    assert "health check failed" in (seen.get("message") or seen.get("last_error") or "")

    def replaced() -> bool:
        now = agent.instance("gemma-0") or {}
        return now.get("pid") not in (None, first["pid"])

    wait_for(replaced, 15, "a new backend after the unhealthy window")
    assert time.monotonic() - stopped_at >= 2.0  # not before the configured window
    ready = agent.wait_state("gemma-0", "ready")
    assert ready["restarts"] == 1
    assert chat(port)
    with pytest.raises(ProcessLookupError):
        os.kill(first["pid"], 0)
