"""Services: the supervisor loop run for real (restart on crash, HUP passed on, stop),
and the systemd/launchd definitions rendered from templates/."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deploys.services import (
    LIMIT_NOFILE,
    Service,
    reload_commands,
    start_commands,
    stop_commands,
    unit_file,
)
from stack.errors import ConfigError


def _wait(check: Callable[[], bool], timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return False


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _sh(commands: list[str]) -> None:
    subprocess.run(["sh", "-c", "\n".join(commands)], check=True, timeout=30)


def test_supervisor_restarts_a_crashed_process_passes_hup_and_stops(tmp_path: Path) -> None:
    prefix = tmp_path / "my prefix"  # a space: every path must be quoted
    script = tmp_path / "proc.sh"
    script.write_text("trap 'echo hup >> \"$0.hup\"' HUP\nwhile :; do sleep 0.1; done\n")
    service = Service("agent", "s", str(prefix), ("sh", str(script)))
    (prefix / "etc").mkdir(parents=True)
    Path(service.unit_path).write_text(unit_file(service))
    _sh(start_commands(service, running=False, restart=False))
    child = Path(service.pid_file)
    try:
        assert _wait(lambda: _pid(child) is not None)
        first = _pid(child)
        assert first is not None
        _sh(reload_commands(service))
        assert _wait(lambda: Path(str(script) + ".hup").exists())
        assert _pid(child) == first  # HUP does not restart
        os.kill(first, 9)
        assert _wait(lambda: _pid(child) not in (None, first))
        assert "restarting in 1s" in Path(service.log).read_text()
    finally:
        _sh(stop_commands(service))
    assert not Path(service.supervisor_pid_file).exists()
    assert _wait(lambda: _pid(child) is None)


def test_systemd_unit_and_launchd_plist_name_the_command_and_log() -> None:
    argv = ("/opt/stack/agent/venv/bin/stack-agent", "--config", "/opt/stack/etc/agent.toml")
    unit = unit_file(Service("agent", "prod", "/opt/stack", argv, manager="systemd"))
    assert f"ExecStart={' '.join(argv)}\n" in unit
    assert "KillMode=process" in unit and "Restart=always" in unit
    plist = unit_file(Service("router", "prod", "/opt/stack", ("/x/stack-router",), "launchd"))
    assert "<string>dev.modelstack-prod-router</string>" in plist
    assert "<string>/x/stack-router</string>" in plist
    service = Service("agent", "prod", "/opt/stack", argv, manager="systemd")
    assert start_commands(service, running=True, restart=False) == []
    assert start_commands(service, running=True, restart=True)[-1] == (
        "systemctl restart modelstack-prod-agent"
    )


def test_systemd_unit_quotes_each_word_the_systemd_way_and_sets_the_open_files_limit() -> None:
    argv = ("/opt/stack/agent/venv/bin/stack-agent", "--config", "/srv/my stack/%h $HOME\"x")
    unit = unit_file(Service("agent", "prod", "/opt/stack", argv, manager="systemd"))
    assert ("ExecStart=/opt/stack/agent/venv/bin/stack-agent --config "
            '"/srv/my stack/%%h $$HOME\\"x"\n') in unit
    assert f"LimitNOFILE={LIMIT_NOFILE}\n" in unit


@pytest.mark.parametrize("manager", ["systemd", "launchd", "supervise"])
def test_no_service_file_is_written_with_a_control_character_in_it(manager: str) -> None:
    service = Service("agent", "prod", "/opt/stack\nExecStartPre=/bin/touch /x",
                      ("/opt/stack/agent/venv/bin/stack-agent",), manager=manager)
    with pytest.raises(ConfigError, match="control character"):
        unit_file(service)


def test_supervise_raises_the_open_files_limit_of_what_it_runs(tmp_path: Path) -> None:
    """Where neither systemd nor launchd runs the agent, supervise.sh raises the soft
    limit itself: to LimitNOFILE's value, or as far as the hard limit allows."""
    import resource

    (tmp_path / "run").mkdir()
    (tmp_path / "logs").mkdir()
    out = tmp_path / "nofile"
    service = Service("probe", "s", str(tmp_path), ("sh", "-c", f"ulimit -n > {out}; sleep 30"))
    script = tmp_path / "supervise.sh"
    script.write_text(unit_file(service))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    proc = subprocess.Popen(["sh", str(script)], start_new_session=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                  (low, hard)))
    try:
        deadline = time.monotonic() + 10
        while not out.exists() or not out.read_text().strip():
            assert time.monotonic() < deadline, "the supervised command did not start"
            time.sleep(0.05)
        want = LIMIT_NOFILE if hard == resource.RLIM_INFINITY else min(LIMIT_NOFILE, hard)
        assert int(out.read_text()) == want > low
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
