"""Two stacks on one host, over real SSH on a loopback host (agents and routers only):

`a` and `b` have their own prefix, agent port and router port and both run side by side
(each records itself on the host);
a third stack `c` on `a`'s agent port is refused by `stack plan` with the reason;
`stack destroy` of `a` stops only `a` (its record goes too, so `c` may have the port now)
and `b`'s plan stays clean. About a minute on 2 cores (two agent installs).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet, run_stack  # tests/ is on sys.path (tests/conftest.py)

pytestmark = pytest.mark.integration


def _stack_toml(fleet: Fleet, name: str, prefix: Path, agent_port: int, router: int) -> str:
    host = fleet.hosts["node-01"]
    return f'''[stack]
name = "{name}"
prefix = "{prefix}"

{fleet.inventory_toml(prefixes=False)}
[nodes."node-01"]
agent_port = {agent_port}

[router]
listen = "{host.address}:{router}"
'''


def _answers(address: str, port: int, wait: float = 0.0) -> bool:
    """Whether something listens there (within `wait` seconds: an agent just started)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with socket.create_connection((address, port), timeout=2):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("two-stacks")
    fleet = Fleet(1, root=work / "fleet")
    fleet.start()
    host = fleet.hosts["node-01"]
    ports: set[int] = set()
    while len(ports) < 4:  # two agents, two routers
        ports.add(fleet.free_port("node-01"))
    agent_a, agent_b, router_a, router_b = sorted(ports)
    stacks = {"a": (agent_a, router_a), "b": (agent_b, router_b),
              "c": (agent_a, fleet.free_port("node-01"))}
    dirs: dict[str, Path] = {}
    for name, (agent, router) in stacks.items():
        dirs[name] = work / name
        dirs[name].mkdir()
        (dirs[name] / "stack.toml").write_text(
            _stack_toml(fleet, name, host.path / "stacks" / name, agent, router))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STACK_SECRET", "two-stacks-test-secret-0123456789ab")
        try:
            yield {"fleet": fleet, "host": host, "dirs": dirs,
                   "agent_a": agent_a, "agent_b": agent_b, "router_a": router_a}
        finally:
            for name in ("a", "b"):
                run_stack("destroy", "--auto-approve", cwd=dirs[name], timeout=120)
            fleet.stop()


def test_1_two_stacks_with_their_own_prefix_and_agent_port_run_side_by_side(
        world: dict[str, Any]) -> None:
    for name in ("a", "b"):
        run = run_stack("apply", "--auto-approve", cwd=world["dirs"][name])
        assert run.returncode == 0, run.stdout + run.stderr
    host = world["host"]
    for port in (world["agent_a"], world["agent_b"]):
        assert _answers(host.address, port, wait=30), port
    for name in ("a", "b"):
        assert _alive(host.path / "stacks" / name / "run" / "agent.pid"), name
    records = host.path / "home" / ".config" / "modelstack" / "stacks"
    assert (records / "a").read_text() == (f"prefix={host.path / 'stacks' / 'a'}\n"
                                           f"agent_port={world['agent_a']}\n"
                                           f"router_port={world['router_a']}\n")
    for name in ("a", "b"):
        plan = run_stack("plan", "--detailed-exitcode", cwd=world["dirs"][name])
        assert plan.returncode == 0, plan.stdout + plan.stderr


def test_2_a_third_stack_on_a_used_agent_port_is_refused_at_plan_time(
        world: dict[str, Any]) -> None:
    plan = run_stack("plan", "--detailed-exitcode", cwd=world["dirs"]["c"])
    assert plan.returncode == 1, plan.stdout + plan.stderr
    assert f"  ! node-01: stack `a` already uses agent port {world['agent_a']} (prefix " \
        f"{world['host'].path / 'stacks' / 'a'})" in plan.stdout.splitlines()
    assert "error: 1 host(s) hold another stack that collides with this one: `node-01`" \
        in plan.stderr
    apply = run_stack("apply", "--auto-approve", cwd=world["dirs"]["c"])
    assert apply.returncode == 1, apply.stdout + apply.stderr
    assert "stack `a` already uses agent port" in apply.stdout
    assert not (world["host"].path / "stacks" / "c").exists()  # nothing written there


def test_3_destroying_one_stack_leaves_the_other_running(world: dict[str, Any]) -> None:
    host, dirs = world["host"], world["dirs"]
    destroy = run_stack("destroy", "--auto-approve", cwd=dirs["a"])
    assert destroy.returncode == 0, destroy.stdout + destroy.stderr
    deadline = time.monotonic() + 30  # the agent was sent TERM: it exits in a moment
    while _answers(host.address, world["agent_a"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _answers(host.address, world["agent_a"])
    assert not (host.path / "home" / ".config" / "modelstack" / "stacks" / "a").exists()
    assert not (host.path / "stacks" / "a" / "run" / "agent.supervisor.pid").exists()
    assert _answers(host.address, world["agent_b"])
    assert _alive(host.path / "stacks" / "b" / "run" / "agent.pid")
    plan = run_stack("plan", "--detailed-exitcode", cwd=dirs["b"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    # `a`'s record went with it: its port is free for `c` now
    again = run_stack("plan", "--detailed-exitcode", cwd=dirs["c"])
    assert again.returncode == 2, again.stdout + again.stderr
