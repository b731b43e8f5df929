"""What one reconcile step returns: when to look again, or that a failure is terminal.

Runners and a Reconciler on a temporary prefix, no agent process; the spawn seam
(`procs.spawn`) is replaced where a test needs an exec error.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import procs
from agent.assignment import Assignment, Instance
from agent.config import AgentConfig, ensure_dirs
from agent.models import ModelStore
from agent.reconcile import Reconciler, write_assignment
from agent.runner import Runner, Shared, StepResult

NOW = 1000.0


@pytest.fixture
def cfg(tmp_path: Path) -> AgentConfig:
    cfg = AgentConfig(node="n", token_file="/t", prefix=str(tmp_path))
    ensure_dirs(cfg)
    return cfg


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def instance(tmp_path: Path, **extra: Any) -> Instance:
    model = tmp_path / "model.bin"
    model.write_text("weights")
    runtime = tmp_path / "runtime"
    (runtime / "bin").mkdir(parents=True, exist_ok=True)
    server = runtime / "bin" / "server"
    server.write_text("#!/bin/sh\nexit 0\n")
    server.chmod(0o755)
    fields: dict[str, Any] = {"id": "i-0", "model": "m", "source": str(model),
                              "backend": "custom", "runtime_path": str(runtime),
                              "command": "server {port}", "port": 40001, **extra}
    return Instance(**fields)


def runner(cfg: AgentConfig, inst: Instance) -> Runner:
    return Runner(inst, Shared(cfg, ModelStore(cfg.models_dir, cfg.state_dir), lambda: None))


@pytest.mark.parametrize("extra", [
    {"command": "server {nope}"},  # command cannot be built
    {"source": "ftp://x/y"},  # invalid source
], ids=["bad-template", "invalid-source"])
def test_a_terminal_failure_asks_for_no_time_and_is_not_tried_again(
        cfg: AgentConfig, tmp_path: Path, extra: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    r = runner(cfg, instance(tmp_path, **extra))
    assert r.step(NOW) == StepResult(requeue_at=None, terminal=True)
    assert r.state == "failed" and r.message and "hint:" in r.message
    tried: list[float] = []
    monkeypatch.setattr(r, "_try_start", tried.append)
    assert r.step(NOW + 3600) == StepResult(terminal=True)
    assert tried == []


def test_a_missing_binary_is_looked_for_once_a_tick_but_not_started(
        cfg: AgentConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = runner(cfg, instance(tmp_path, runtime_path="/nowhere"))
    assert r.step(NOW) == StepResult(requeue_at=NOW + 1, terminal=True)
    assert r.state == "failed" and "runtime binary" in (r.message or "")
    tried: list[float] = []
    monkeypatch.setattr(r, "_try_start", tried.append)
    assert r.step(NOW + 3600) == StepResult(requeue_at=NOW + 3601, terminal=True)
    assert tried == []


def test_a_busy_port_is_looked_at_again_one_tick_later(
        cfg: AgentConfig, tmp_path: Path, busy_port: int) -> None:
    r = runner(cfg, instance(tmp_path, port=busy_port))
    assert r.step(NOW) == StepResult(requeue_at=NOW + cfg.tuning.tick_seconds)
    assert r.state == "failed" and "already in use" in (r.message or "")
    assert r.step(NOW + 0.5) == StepResult(requeue_at=NOW + 1)  # not due: nothing done


@pytest.mark.parametrize(("code", "same_file", "terminal"), [
    (errno.ENOEXEC, True, True), (errno.EACCES, True, True),
    (errno.EAGAIN, True, False), (errno.ENOENT, False, False),  # the cwd, not the binary
])
def test_an_exec_error_of_the_binary_is_terminal_and_others_back_off(
        cfg: AgentConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        code: int, same_file: bool, terminal: bool) -> None:
    inst = instance(tmp_path)
    binary = str(Path(inst.runtime_path) / "bin" / "server")

    def spawn(argv: list[str], *_: object) -> None:
        raise OSError(code, "refused", binary if same_file else str(cfg.instances_dir))

    monkeypatch.setattr(procs, "spawn", spawn)
    r = runner(cfg, inst)
    result = r.step(NOW)
    assert r.state == "failed" and f"cannot start {binary}: refused" in (r.message or "")
    if terminal:
        assert result == StepResult(terminal=True)
    else:  # the first retry at the next tick at the earliest, then the crash backoff
        assert result == StepResult(requeue_at=NOW + 1) and "retrying in 1 s" in (r.message or "")


def test_a_reconcile_pass_requests_only_times_after_now(
        cfg: AgentConfig, tmp_path: Path, busy_port: int) -> None:
    reconciler = Reconciler(cfg)
    broken = instance(tmp_path, id="broken-0", runtime_path="/nowhere", port=40002)
    write_assignment(cfg, Assignment(node="n", instances=[broken]))
    assert reconciler.tick(NOW) == NOW + 1  # a missing binary is looked for once a tick
    assert reconciler.runners["broken-0"].state == "failed"
    busy = instance(tmp_path, id="busy-0", port=busy_port)
    write_assignment(cfg, Assignment(node="n", instances=[broken, busy]))
    assert reconciler.tick(NOW + 5) == NOW + 6
    assert reconciler.tick(NOW + 6) == NOW + 7
