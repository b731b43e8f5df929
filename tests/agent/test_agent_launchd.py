"""The agent's launchd service on macOS, as data: the plist `stack apply` writes and the
`launchctl` commands that start, stop and reload it. launchd does not run here, so the
plist is checked by parsing it (plistlib, the same XML plist format launchd reads) and
by the keys launchd.plist(5) documents; the commands by their words.
"""

from __future__ import annotations

import plistlib
import shlex
from typing import Any

import pytest

from deploys.services import (
    LIMIT_NOFILE,
    Service,
    reload_commands,
    start_commands,
    stop_commands,
    unit_file,
)
from stack.config import check_text
from stack.hostfiles import agent_service

HOSTILE_PREFIX = "/Users/Shared/my stack & <co> \"it's\""


def _plist(service: Service) -> dict[str, Any]:
    value = plistlib.loads(unit_file(service).encode())
    assert isinstance(value, dict)
    return value


def _agent(prefix: str, stack: str = "prod") -> Service:
    spec, problems = check_text(f'[stack]\nname = "{stack}"\n')
    assert spec is not None, problems
    return agent_service(spec, prefix, "launchd")


def test_the_agent_plist_holds_exactly_the_launchd_keys_with_hostile_paths_intact() -> None:
    assert _plist(_agent(HOSTILE_PREFIX)) == {
        "Label": "dev.modelstack-prod-agent",
        "ProgramArguments": [f"{HOSTILE_PREFIX}/agent/venv/bin/stack-agent", "--config",
                             f"{HOSTILE_PREFIX}/etc/agent.toml"],
        "RunAtLoad": True,   # started when loaded and at boot
        "KeepAlive": True,   # restarted whenever it exits
        # launchd kills the job's process group when it stops; backends outlive the agent
        "AbandonProcessGroup": True,
        # as many open files as the systemd unit's LimitNOFILE (launchd's default is 256)
        "SoftResourceLimits": {"NumberOfFiles": LIMIT_NOFILE},
        "HardResourceLimits": {"NumberOfFiles": LIMIT_NOFILE},
        "StandardOutPath": f"{HOSTILE_PREFIX}/logs/agent.log",
        "StandardErrorPath": f"{HOSTILE_PREFIX}/logs/agent.log",
    }


@pytest.mark.parametrize("stack", ["a--b", "x-", "my-stack--"])
def test_a_stack_name_with_double_dashes_still_gives_a_plist_that_parses(stack: str) -> None:
    # an XML comment cannot hold `--`: the stack's name is only in the Label
    assert _plist(_agent("/opt/stack", stack))["Label"] == f"dev.modelstack-{stack}-agent"


def test_the_plist_file_is_named_after_its_label_in_the_system_daemons_folder() -> None:
    service = _agent(HOSTILE_PREFIX)
    label = _plist(service)["Label"]
    assert service.unit_path == f"/Library/LaunchDaemons/{label}.plist"


def test_launchctl_commands_name_the_plist_and_the_service_as_one_word_each() -> None:
    service = _agent(HOSTILE_PREFIX)
    plist = shlex.quote(service.unit_path)
    assert start_commands(service, running=False, restart=False) == [
        f"launchctl unload {plist} 2>/dev/null || true", f"launchctl load -w {plist}"]
    assert start_commands(service, running=True, restart=True) == \
        start_commands(service, running=False, restart=False)
    assert start_commands(service, running=True, restart=False) == []
    assert stop_commands(service) == [f"launchctl unload -w {plist} 2>/dev/null || true"]
    # the service target of `launchctl kill` is system/<the plist's Label>
    [reload] = reload_commands(service)
    assert shlex.split(reload) == ["launchctl", "kill", "HUP",
                                   f"system/{_plist(service)['Label']}"]
