"""A failed instance does not keep the agent busy: terminal failures wait for a new spec,
crashes follow the backoff, pre-start checks look again once a tick (real agents, ~20 s).

Start attempts are counted by `counting_agent.py` (one line per `Runner._try_start`);
spawns by the `--- ... starting` lines the agent writes into the backend's log.
"""

from __future__ import annotations

import itertools
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from agent_harness import COUNTING_AGENT, Agent, free_port

from agent.runner import backoff_delay

pytestmark = pytest.mark.integration

WINDOW = 3.0  # the window: 139 attempts of a missing binary in 3 s


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path / "prefix", command=COUNTING_AGENT,
              env={"STACK_TEST_START_ATTEMPTS": str(tmp_path / "attempts")})
    yield a
    a.cleanup()


def attempts(agent: Agent, instance_id: str) -> int:
    path = Path(agent.env["STACK_TEST_START_ATTEMPTS"])
    lines = path.read_text().splitlines() if path.exists() else []
    return lines.count(instance_id)


def spawns(agent: Agent, instance_id: str) -> int:
    log = agent.prefix / "logs" / f"{instance_id}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(1 for line in text.splitlines() if line.startswith("--- ") and " starting " in line)


def runtime_with(root: Path, programs: dict[str, tuple[str, int]]) -> Path:
    """A runtime folder whose bin/ holds the given programs (text, mode)."""
    runtime = root / "runtimes" / "custom" / "test"
    (runtime / "bin").mkdir(parents=True, exist_ok=True)
    for name, (text, mode) in programs.items():
        (runtime / "bin" / name).write_text(text)
        (runtime / "bin" / name).chmod(mode)
    return runtime


# a TCP server, so the custom backend's default health check (TCP connect) passes
SERVER = f'#!/bin/sh\nexec "{sys.executable}" -m http.server --bind 127.0.0.1 "$1"\n'


def custom(iid: str, model: Path, runtime: Path, command: str, **extra: Any) -> dict[str, Any]:
    return {"id": iid, "model": iid, "source": str(model), "backend": "custom",
            "runtime_path": str(runtime), "command": command, "port": free_port(), **extra}


def test_terminal_failures_are_tried_once_and_a_busy_port_once_a_tick(
        agent: Agent, tmp_path: Path) -> None:
    model = tmp_path / "model.bin"
    model.write_text("weights")
    runtime = runtime_with(tmp_path, {"server": (SERVER, 0o755), "plain": (SERVER, 0o644),
                                      "garbage": ("not a program\n", 0o755)})
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    agent.start()
    instances = [
        {**custom("no-binary", model, tmp_path / "nowhere", "x"), "backend": "llama.cpp"},
        custom("not-executable", model, runtime, "plain {port}"),
        custom("exec-format", model, runtime, "garbage {port}"),
        custom("bad-template", model, runtime, "server {nope}"),
        custom("bad-source", model, runtime, "server {port}", source="ftp://x/y"),
        {**custom("port-taken", model, runtime, "server {port}"),
         "port": busy.getsockname()[1]},
    ]
    expected = {
        "no-binary": "runtime binary", "not-executable": "is not executable",
        "exec-format": "Exec format error", "bad-template": "bad `command` template",
        "bad-source": "is not hf://", "port-taken": "is already in use",
    }
    try:
        assert agent.assign(instances).status_code == 200
        failed = {iid: agent.wait_state(iid, "failed", timeout=10) for iid in expected}
        before = attempts(agent, "port-taken")
        time.sleep(WINDOW)
        counts = {iid: attempts(agent, iid) for iid in expected}
        busy_rechecks = counts["port-taken"] - before
    finally:
        busy.close()
    terminal = {iid: n for iid, n in counts.items() if iid != "port-taken"}
    assert all(1 <= n <= 2 for n in terminal.values()), counts
    assert spawns(agent, "exec-format") == counts["exec-format"]
    # tick_seconds = 1: the busy port is looked at again about once a second
    assert 2 <= busy_rechecks <= WINDOW + 2, counts
    for iid, text in expected.items():
        error = failed[iid]["last_error"]
        assert text in error and "hint:" in error, (iid, error)
    assert agent.proc is not None and agent.proc.poll() is None


def test_terminal_failure_is_retried_once_the_spec_changes(
        agent: Agent, tmp_path: Path) -> None:
    """A binary the kernel refuses (exec format error) is not tried again when it is
    fixed on the host without a new spec; new args (a new spec) start it at once."""
    model = tmp_path / "model.bin"
    model.write_text("weights")
    runtime = runtime_with(tmp_path, {"server": ("not a program\n", 0o755)})
    agent.start()
    first = custom("srv", model, runtime, "server {port}")
    assert agent.assign([first]).status_code == 200
    failed = agent.wait_state("srv", "failed", timeout=10)
    assert "Exec format error" in failed["last_error"]

    runtime_with(tmp_path, {"server": (SERVER, 0o755)})  # fixed: not a new spec
    time.sleep(WINDOW)
    assert agent.instance("srv")["state"] == "failed"  # type: ignore[index]
    assert attempts(agent, "srv") <= 2

    tried = attempts(agent, "srv")
    assert agent.assign([{**first, "args": ["--changed"]}]).status_code == 200
    ready = agent.wait_state("srv", "ready", timeout=15)
    assert ready["spec_hash"] != failed["spec_hash"] and ready["last_error"] is None
    assert attempts(agent, "srv") == tried + 1


def test_a_missing_runtime_binary_is_used_once_it_is_installed(
        agent: Agent, tmp_path: Path) -> None:
    """The one terminal failure looked at again: `stack apply` installs a missing runtime
    without changing the assignment, and the instance starts (one start, no spin)."""
    model = tmp_path / "model.bin"
    model.write_text("weights")
    runtime = runtime_with(tmp_path, {})
    agent.start()
    assert agent.assign([custom("srv", model, runtime, "server {port}")]).status_code == 200
    failed = agent.wait_state("srv", "failed", timeout=10)
    assert "runtime binary" in failed["last_error"]
    time.sleep(WINDOW)
    assert attempts(agent, "srv") == 1  # looked for once a tick, never started

    runtime_with(tmp_path, {"server": (SERVER, 0o755)})
    agent.wait_state("srv", "ready", timeout=15)
    assert attempts(agent, "srv") == 2 and spawns(agent, "srv") == 1


def backoff_starts(seconds: float) -> int:
    """Starts the crash backoff allows in `seconds` for a backend that exits at once."""
    starts, at = 1, 0.0
    while (at := at + backoff_delay(starts)) <= seconds:
        starts += 1
    return starts


def start_times(agent: Agent, instance_id: str) -> list[float]:
    """When the agent logged each start of the instance (seconds, from its log lines)."""
    marker = f"instance {instance_id} started pid"
    stamps = [line.split(" INFO ")[0] for line in agent.output().splitlines() if marker in line]
    return [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in stamps]


def test_crash_looping_backend_is_restarted_on_the_backoff_schedule(
        agent: Agent, tmp_path: Path) -> None:
    model = tmp_path / "model.bin"
    model.write_text("weights")
    agent.start()
    window = 5.0  # starts at 0, 0, 1 and 3 s; the next at 7 s: 2 s of slack either side
    assigned = time.monotonic()
    crash = custom("crash", model, tmp_path, '/bin/sh -c "exit 3"')
    assert agent.assign([crash]).status_code == 200
    time.sleep(window - (time.monotonic() - assigned))
    assert spawns(agent, "crash") == backoff_starts(window) == 4
    inst = agent.instance("crash") or {}
    assert inst["state"] == "crash-looping" and inst["last_exit_code"] == 3, inst
    assert "restarting in" in inst["last_error"]
    assert attempts(agent, "crash") == spawns(agent, "crash")
    started = start_times(agent, "crash")
    gaps = [b - a for a, b in itertools.pairwise(started)]
    delays = [backoff_delay(n) for n in range(1, len(started))]  # 0, 1, 2 s
    assert len(gaps) == 3, gaps
    assert all(d - 0.05 <= g <= d + 0.5 for g, d in zip(gaps, delays, strict=True)), gaps
