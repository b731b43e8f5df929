"""Reboots: one host at a time, each back (SSH, GPUs, driver) before the next goes down."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import gevent

from deploys.drivers import DriverRequest
from deploys.services import start_commands
from deploys.steps import Step
from stack import remote
from stack.apply.hosts import Node
from stack.apply.report import ApplyOptions, ApplyResult, HostReport
from stack.apply.targets import driver_requests
from stack.hostfiles import agent_service

if TYPE_CHECKING:
    from pyinfra.api.host import Host
from stack.snapshot import NodeFacts
from stack.spec import StackSpec

REBOOT_COMMAND = "(sleep 2; reboot) >/dev/null 2>&1 &"  # returns before the host goes down
REBOOT_DOWN_TIMEOUT = 300.0  # a shutdown may wait for slow services this long
REBOOT_POLL = 2.0


def back_after_reboot(before: NodeFacts, after: NodeFacts,
                      requests: list[DriverRequest]) -> bool:
    """Whether a rebooted host is back: it answers, no reboot is pending any more, every
    GPU it had is seen again and every driver is in its desired state."""
    from deploys.drivers import driver_commands

    if not after.reachable or after.error or after.reboot_required:
        return False
    if len(after.gpus) < len(before.gpus):
        return False
    return all(driver_commands(after, request) == [] for request in requests)


def _wait_down(host: remote.Host, limit: float) -> bool:
    """Whether the host's SSH connection dropped (it is going down) within `limit` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with gevent.Timeout(10):
                ok, _, _ = remote.run(host, "true")
        except (Exception, gevent.Timeout):
            return True
        if not ok:
            return True
        gevent.sleep(0.5)
    return False


def _reconnect(host: Host) -> None:
    """A new SSH connection for a pyinfra host whose old one died with a reboot."""
    from pyinfra.context import ctx_host, ctx_state

    client = getattr(host.connector, "client", None)
    with contextlib.suppress(Exception):
        host.disconnect()  # drops the SFTP client bound to the dead connection
        if client is not None:
            client.close()
    host.connected = False
    with ctx_state.use(host.state), ctx_host.use(host):
        host.connect(show_errors=False, raise_exceptions=True)


def _wait_back(node: Node, spec: StackSpec, stack_dir: Path, requests: list[DriverRequest],
               timeout: float) -> NodeFacts | None:
    """The host's fresh facts once it is back from its reboot; None: not within `timeout` s."""
    from stack.observe import read_node

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gevent.sleep(REBOOT_POLL)
        with remote.session(spec, stack_dir, hosts=[node.name]) as connected:
            if node.name in connected.errors:
                continue
            facts = read_node(spec, connected, node.name)
        if back_after_reboot(node.facts, facts, requests):
            return facts
    return None


def _reboot(node: Node, spec: StackSpec, stack_dir: Path, report: HostReport,
            requests: list[DriverRequest], progress: Callable[[str], None],
            timeout: float = 900) -> bool:
    """Reboot one host, wait until it went down and came back (SSH answers, no reboot
    pending, the driver working), reconnect it and keep its fresh facts. False: failed."""
    progress(f"{node.name}: rebooting")
    try:
        remote.run(node.host, REBOOT_COMMAND)
    except Exception as exc:  # the connection died already: it is going down
        progress(f"{node.name}: {exc}")
    if not _wait_down(node.host, min(timeout, REBOOT_DOWN_TIMEOUT)):
        report.fail(f"`{node.name}` was still up {int(min(timeout, REBOOT_DOWN_TIMEOUT))} s "
                    "after `reboot`",
                    "check that the SSH user may run `reboot` (or set `sudo = true` under "
                    "`[nodes.\"...\"]`), then run `stack apply --allow-reboot` again.")
        return False
    progress(f"{node.name}: down, waiting for it to come back")
    facts = _wait_back(node, spec, stack_dir, requests, timeout)
    if facts is None:
        report.fail(f"`{node.name}` did not come back with a working driver within "
                    f"{int(timeout)} s after the reboot",
                    "check the host's console; `stack apply` continues from here once it is up.")
        return False
    try:
        _reconnect(node.host)
    except Exception as exc:
        report.fail(f"`{node.name}` came back from its reboot but apply could not "
                    f"reconnect: {exc}", "run `stack apply` again.")
        return False
    node.facts = facts
    report.changed.append("rebooted")
    progress(f"{node.name}: back after the reboot")
    return True


def _restart_agent(spec: StackSpec, node: Node, report: HostReport) -> None:
    """Start the agent again after a reboot where no service manager does it (the
    supervised background process); systemd and launchd start it at boot."""
    service = agent_service(spec, node.prefix, node.manager)
    if service.manager != "supervise":
        return
    alive = bool(node.probed.alive.get(service.supervisor_pid_file))
    for command in start_commands(service, running=alive, restart=False):
        ok, _, err = remote.run(node.host, command)
        if not ok:
            report.fail(f"`{node.name}`: the agent did not start after the reboot: "
                        f"{err.strip()}", f"read {service.log} on the host.")
            return


def reboots(spec: StackSpec, stack_dir: Path, live: list[Node], plans: dict[str, list[Step]],
            result: ApplyResult, options: ApplyOptions, probe: Callable[[Node], None],
            progress: Callable[[str], None],
            check: Callable[[], None] = lambda: None) -> None:
    """Reboot the hosts that need it, one at a time, each back before the next goes down;
    without `--allow-reboot` (or once one did not come back) they are reported instead."""
    stopped_by = ""
    for node in live:
        steps = plans.get(node.name, [])
        report = result.hosts[node.name]
        if report.error is not None or not any(s.reboot for s in steps):
            continue
        check()  # an interrupt stops apply between reboots, never during one
        driver = any(s.key == "driver" and s.commands for s in steps)
        why = " to load its new driver" if driver else ": the host reports that one is pending"
        if not options.allow_reboot:
            report.fail(f"`{node.name}` needs a reboot{why}",
                        "run `stack apply --allow-reboot` (hosts reboot one at a time).")
        elif stopped_by:
            report.fail(f"`{node.name}` needs a reboot{why}, which was not started because "
                        f"`{stopped_by}` did not come back from its own",
                        f"bring `{stopped_by}` back, then run `stack apply --allow-reboot`.")
        elif _reboot(node, spec, stack_dir, report, driver_requests(spec, node), progress):
            probe(node)  # what is running now (the reboot stopped what apply started)
            if report.error is None:
                _restart_agent(spec, node, report)
        else:
            stopped_by = node.name
