"""`stack apply`: converge the fleet on the plan, host by host, and report every host.

    lock -> facts -> plan (fresh, or a saved one checked for staleness) -> confirm
    -> deploys (one pyinfra run, parallel over hosts; unchanged hosts only no-op)
    -> reboots (only with --allow-reboot, one host at a time)
    -> assignments, rolling: new instances are added beside the old ones and must be
       `ready` before the router is pointed at them and the old ones are removed
       (replacements in place go at most `--max-unavailable` at a time)
    -> router config written and reloaded -> runtime versions nobody uses removed
    -> `state/managed` written (what the next plan compares against) -> locks released.

What apply writes is the plan's: its assignments with the API keys filled in, its files.

A host that fails is named with the reason; the others converge; the result says so and
the command exits 1. Every step is idempotent, so an interrupted apply is finished by the
next one. Ctrl-C during the deploys and reboots stops apply once the steps in progress are
done on every host (a second Ctrl-C stops it at once): a command left running on a host
after apply exits could race the next apply.

Where each step lives: `hosts` (the hosts, their facts, locks and state), `desired` (what
the plan turns into), `targets` (what each host needs), `deploy` (the pyinfra run),
`interrupt` (Ctrl-C), `reboot`, `rollout` (the assignments), `routers`, `runtimes` (the
versions nobody uses), `manifest` (`state/managed`, written last), `report` (the options
and what apply did on each host).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import gevent

from agent.assignment import Assignment
from stack import lock as locks
from stack.apply.deploy import run_deploys, stop_between_operations
from stack.apply.desired import Desired, desired_state, keep_unknown
from stack.apply.hosts import (
    Node,
    host_probe,
    leave_conflicts,
    manageable,
    read_fleet,
    release_host_locks,
)
from stack.apply.interrupt import Interrupt
from stack.apply.manifest import write_manifests
from stack.apply.reboot import reboots
from stack.apply.report import ApplyOptions, ApplyResult, HostReport
from stack.apply.rollout import finish_assignments, rollout
from stack.apply.routers import update_routers
from stack.apply.runtimes import remove_unused_runtimes
from stack.apply.targets import host_targets, model_uploads
from stack.errors import ApplyError, StackError
from stack.hostfiles import MANIFEST, agent_service, router_service
from stack.plan import Plan
from stack.snapshot import Observed
from stack.spec import StackSpec

if TYPE_CHECKING:
    from pyinfra.api.state import State

__all__ = ["ApplyOptions", "ApplyResult", "Desired", "HostReport", "apply_fleet"]


def apply_fleet(
    spec: StackSpec, stack_dir: Path, plan_for: Callable[[Observed], Plan],
    options: ApplyOptions, confirm: Callable[[Observed, Desired], bool],
    progress: Callable[[str], None],
) -> ApplyResult:
    """Lock, read the fleet, converge it, unlock. `plan_for(observed)` gives the plan to
    apply (a fresh one, or a saved one checked against the facts)."""
    from stack.observe import connect, disconnect

    info = locks.new_lock()
    locks.acquire_local(stack_dir, info)
    result = ApplyResult(lock_id=info.id)
    nodes: list[Node] = []
    connected = None
    try:
        connected = connect(spec, stack_dir, trust_new=options.trust_new_hosts)
        observed = read_fleet(spec, connected)
        nodes = manageable(spec, connected, observed, result.hosts)
        plan = plan_for(observed)
        nodes = leave_conflicts(nodes, plan, result.hosts)
        desired = desired_state(spec, stack_dir, plan)
        if not confirm(observed, desired):
            raise ApplyError("apply cancelled; nothing was changed", hint="")
        probe = functools.partial(_probe, spec, stack_dir, info, desired, result.hosts)
        gevent.joinall([gevent.spawn(probe, n) for n in nodes])
        keep_unknown(desired, plan, nodes)
        probed = [n for n in nodes if result.hosts[n.name].error is None]
        _deploy(spec, stack_dir, connected.state, probed, desired, result, options, probe,
                progress)
        live = [n for n in probed if result.hosts[n.name].error is None]
        rollout(live, desired, result.hosts, options, progress)
        result.router_changed = update_routers(spec, live, desired, result.hosts)
        finish_assignments(live, desired, result.hosts, options, progress)
        remove_unused_runtimes(spec, live, desired, result.hosts)
        write_manifests(plan, probed, result.hosts)
        return result
    finally:
        if nodes:
            release_host_locks(nodes, info.id)
        if connected is not None:
            disconnect(connected)
        locks.release_local(stack_dir, info.id)


def _probe(spec: StackSpec, stack_dir: Path, lock: locks.LockInfo, desired: Desired,
           reports: dict[str, HostReport], node: Node) -> None:
    """Take the host's lock and read its state: the files of every service manager, the
    manifest and the sidecars of the models this apply uploads there."""
    try:
        extra = [make(spec, node.prefix, manager).unit_path
                 for make in (agent_service, router_service)
                 for manager in ("supervise", "systemd", "launchd")]
        # one sidecar per uploaded file (a folder model has one per file in it)
        want = desired.assignments.get(node.name, Assignment(node=node.name))
        models = [f"{m.dest}.sha256" for m in model_uploads(want, stack_dir)]
        host_probe(node, lock, [*extra, f"{node.prefix}/{MANIFEST}"], models)
    except StackError as err:
        reports[node.name].fail(err.message, err.hint)


def _deploy(spec: StackSpec, stack_dir: Path, state: State, nodes: list[Node], desired: Desired,
            result: ApplyResult, options: ApplyOptions, probe: Callable[[Node], None],
            progress: Callable[[str], None]) -> None:
    """The deploys, then the reboots; a Ctrl-C stops apply between steps, never in one."""
    targets, runtime_keys, model_keys = host_targets(spec, stack_dir, nodes, desired,
                                                     result.hosts)
    with Interrupt() as interrupt:
        stop_between_operations(state, interrupt)
        plans = run_deploys(state, nodes, targets, runtime_keys, model_keys, result.hosts)
        interrupt.check()
        reboots(spec, stack_dir, nodes, plans, result, options, probe, progress,
                interrupt.check)
