"""`stack apply`: converge the fleet on the plan, host by host, and report every host.

    lock -> facts -> plan (fresh, or a saved one checked for staleness) -> confirm
    -> deploys (one pyinfra run, parallel over hosts; unchanged hosts only no-op)
    -> reboots (only with --allow-reboot, one host at a time)
    -> assignments, rolling: new instances are added beside the old ones and must be
       `ready` before the router is pointed at them and the old ones are removed
       (replacements in place go at most `--max-unavailable` at a time)
    -> router config written and reloaded -> runtime versions nobody uses removed
    -> locks released.

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
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent

from agent.assignment import Assignment, Instance
from deploys.facts import agent_status_body, facts_command
from deploys.runtimes import removal_script, runtime_path, unused_versions
from deploys.services import reload_commands, start_commands
from deploys.state import dumps
from deploys.steps import agent_paths, sha256_text
from stack import lock as locks
from stack import remote
from stack.apply.deploy import run_deploys, stop_between_operations
from stack.apply.desired import Desired, desired_state, keep_unknown
from stack.apply.hosts import Node, host_probe, manageable, read_fleet, release_host_locks
from stack.apply.interrupt import Interrupt
from stack.apply.reboot import reboots
from stack.apply.report import ApplyOptions, ApplyResult, HostReport
from stack.apply.targets import host_targets, model_uploads
from stack.errors import ApplyError, StackError
from stack.hostfiles import (
    MANIFEST,
    HostFile,
    agent_service,
    manifest_text,
    router_body,
    router_service,
)
from stack.observed import Observed
from stack.plan import Plan
from stack.spec import StackSpec

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
        connected = connect(spec, stack_dir)
        observed = read_fleet(spec, connected)
        nodes = manageable(spec, connected, observed, result.hosts)
        plan = plan_for(observed)
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


def _deploy(spec: StackSpec, stack_dir: Path, state: Any, nodes: list[Node], desired: Desired,
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


# -- rollout (moved to its modules next) --

def _agent_status(node: Node) -> dict[str, Any]:
    """The agent's status on the host ({} when it cannot be read now): its status file
    while it runs, else `stack-agent status --json` (deploys/facts.sh, agent part only)."""
    ok, out, _ = remote.run(node.host, facts_command(node.prefix, agent_only=True))
    try:
        raw = json.loads(out) if ok else {}
    except json.JSONDecodeError:
        raw = {}
    return (agent_status_body(raw) if isinstance(raw, dict) else None) or {}


def _surge(current: Assignment | None, desired: Assignment, hold: set[str]) -> Assignment:
    """The desired instances plus the old ones not yet replaced: nothing goes away before
    its replacement is ready. `hold`: ids whose old version stays for now."""
    old = {i.id: i for i in (current.instances if current else [])}
    chosen: dict[str, Instance] = {}
    for inst in desired.instances:
        chosen[inst.id] = old[inst.id] if inst.id in hold and inst.id in old else inst
    ports = {i.port for i in chosen.values()}
    for iid, inst in old.items():
        if iid not in chosen and inst.port not in ports:
            chosen[iid] = inst
            ports.add(inst.port)
    return Assignment(node=desired.node, instances=sorted(chosen.values(), key=lambda i: i.id))


def _write_assignment(node: Node, assignment: Assignment) -> bool:
    """Write assignment.json if it differs; the agent picks the change up itself."""
    body = dumps(assignment.model_dump(mode="json")).encode()
    path = agent_paths(node.prefix)["assignment"]
    if node.files.get("files", {}).get(path) == sha256_text(body):
        return False
    remote.write(node.host, path, body, "600")
    node.files.setdefault("files", {})[path] = sha256_text(body)
    node.current = assignment
    return True


def _poll_ready(node: Node, pending: dict[str, dict[str, str]], last: dict[str, str],
                reports: dict[str, HostReport], progress: Callable[[str], None]) -> None:
    """Read the host's agent once: drop from `pending` what is ready or failed, and say
    what changed (`last`: each instance's state when last said)."""
    name = node.name
    body = _agent_status(node)
    states = {str(i.get("id")): i for i in body.get("instances") or []}
    for iid, spec_hash in list(pending[name].items()):
        item = states.get(iid, {})
        state = str(item.get("state", "missing"))
        if state == "ready" and item.get("spec_hash") not in (None, spec_hash):
            state = "still the old version"
        if state == "ready" and item.get("spec_hash") in (None, spec_hash):
            del pending[name][iid]
            progress(f"{name}: {iid} is ready")
        elif state == "failed":
            reports[name].fail(
                f"`{name}`: instance `{iid}` failed: {item.get('last_error') or state}",
                f"read `stack logs {item.get('model', iid)}` for the backend's output.")
            del pending[name][iid]
        elif last.get(iid) != state:
            last[iid] = state
            progress(f"{name}: {iid} is {state}")
    if body.get("assignment_error"):
        reports[name].fail(f"`{name}`: the agent rejected its assignment: "
                           f"{body['assignment_error']}",
                           "this is a bug in stack apply; please report it.")
        pending[name].clear()
    if not pending[name]:
        del pending[name]


def _wait_ready(nodes: list[Node], wanted: dict[str, dict[str, str]],
                reports: dict[str, HostReport], options: ApplyOptions,
                progress: Callable[[str], None]) -> None:
    """Poll the agents until every wanted instance (id -> spec hash) is `ready`."""
    deadline = time.monotonic() + options.ready_timeout
    pending = {n.name: dict(wanted.get(n.name, {})) for n in nodes if wanted.get(n.name)}
    by_name = {n.name: n for n in nodes}
    last: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        jobs = [gevent.spawn(_poll_ready, by_name[name], pending, last, reports, progress)
                for name in list(pending)]
        gevent.joinall(jobs)
        if pending:
            gevent.sleep(options.poll_interval)
    for name, ids in pending.items():
        states = ", ".join(f"{i} ({last.get(i, 'unknown')})" for i in sorted(ids))
        reports[name].fail(
            f"`{name}`: not ready after {int(options.ready_timeout)} s: {states}",
            "read `stack logs MODEL` and `stack status`; the next apply picks up from here.")


def _changes(nodes: list[Node], desired: Desired,
             ) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]]]:
    """The instances to wait for (node -> id -> spec hash: not yet ready as desired) and
    the replacements in place ((node, id): the old version must go first)."""
    changed: dict[str, dict[str, str]] = {}
    replaced: list[tuple[str, str]] = []
    for node in nodes:
        want = desired.assignments.get(node.name, Assignment(node=node.name))
        old = {i.id: i.spec_hash() for i in (node.current.instances if node.current else [])}
        running = {i.id: i.spec_hash for i in node.facts.agent.instances if i.state == "ready"}
        for inst in want.instances:
            fresh = old.get(inst.id) != inst.spec_hash()
            if fresh or running.get(inst.id) not in (inst.spec_hash(), None) \
                    or inst.id not in running:
                # not yet ready as desired: wait for it (written earlier, or now)
                changed.setdefault(node.name, {})[inst.id] = inst.spec_hash()
            if fresh and inst.id in old:
                replaced.append((node.name, inst.id))
    return changed, replaced


def rollout(nodes: list[Node], desired: Desired, reports: dict[str, HostReport],
            options: ApplyOptions, progress: Callable[[str], None]) -> None:
    """Assignments in waves: new beside old, replacements `max_unavailable` at a time."""
    live = [n for n in nodes if reports[n.name].error is None]
    changed, replaced = _changes(live, desired)
    step = max(1, options.max_unavailable)
    waves = [replaced[k:k + step] for k in range(0, len(replaced), step)] or [[]]
    for wave_index, _wave in enumerate(waves):
        done = {r for w in waves[:wave_index + 1] for r in w}
        hold_all = {r for r in replaced if r not in done}
        for node in live:
            if reports[node.name].error is not None:
                continue
            want = desired.assignments.get(node.name, Assignment(node=node.name))
            hold = {iid for (n, iid) in hold_all if n == node.name}
            try:
                if _write_assignment(node, _surge(node.current, want, hold)):
                    reports[node.name].changed.append("assignment")
            except StackError as err:
                reports[node.name].fail(err.message, err.hint)
        wanted = {n: {iid: h for iid, h in ids.items()
                      if (n, iid) not in hold_all}
                  for n, ids in changed.items() if reports[n].error is None}
        _wait_ready(live, wanted, reports, options, progress)


def finish_assignments(nodes: list[Node], desired: Desired, reports: dict[str, HostReport],
                       options: ApplyOptions | None = None,
                       progress: Callable[[str], None] = lambda line: None) -> None:
    """Remove the old instances (their replacements are ready and routed) and wait until
    their agents have stopped them, so a plan right after apply finds nothing to do."""
    gone: dict[str, set[str]] = {}
    for node in nodes:
        if reports[node.name].error is not None:
            continue
        want = desired.assignments.get(node.name, Assignment(node=node.name))
        before = {i.id for i in (node.current.instances if node.current else [])}
        try:
            if _write_assignment(node, want) and "assignment" not in reports[node.name].changed:
                reports[node.name].changed.append("assignment")
        except StackError as err:
            reports[node.name].fail(err.message, err.hint)
            continue
        removed = before - {i.id for i in want.instances}
        if removed:
            gone[node.name] = removed
    _wait_gone(nodes, gone, reports, options or ApplyOptions(), progress)


def _wait_gone(nodes: list[Node], gone: dict[str, set[str]], reports: dict[str, HostReport],
               options: ApplyOptions, progress: Callable[[str], None],
               status: Callable[[Node], dict[str, Any]] | None = None) -> None:
    """Poll the agents until none reports an instance of `gone` (node -> ids) any more."""
    read = status or _agent_status
    by_name = {n.name: n for n in nodes}
    pending = {name: set(ids) for name, ids in gone.items() if ids}
    deadline = time.monotonic() + options.stop_timeout
    while pending and time.monotonic() < deadline:
        def poll(name: str) -> None:
            body = read(by_name[name])
            if "instances" not in body:
                return  # not readable now: ask again
            listed = {str(i.get("id")) for i in body["instances"] or []}
            for iid in sorted(pending[name] - listed):
                progress(f"{name}: {iid} is stopped")
            pending[name] &= listed
            if not pending[name]:
                del pending[name]

        gevent.joinall([gevent.spawn(poll, name) for name in list(pending)])
        if pending:
            gevent.sleep(options.poll_interval)
    for name, ids in sorted(pending.items()):
        reports[name].fail(
            f"`{name}`: {', '.join(sorted(ids))} still running {options.stop_timeout:g} s "
            "after it was removed from the assignment",
            "the agent keeps stopping it; see `stack status` and `stack logs MODEL`.")

def update_routers(spec: StackSpec, nodes: list[Node], desired: Desired,
                   reports: dict[str, HostReport]) -> bool:
    """Write router.json where it differs and start or reload the router (SIGHUP)."""
    if desired.router is None:
        return False
    body = router_body(desired.router)
    changed = False
    for node in nodes:
        if node.name not in desired.router_nodes or reports[node.name].error is not None:
            continue
        service = router_service(spec, node.prefix, node.manager)
        path = agent_paths(node.prefix)["router_json"]
        alive = bool(node.files.get("alive", {}).get(service.supervisor_pid_file))
        if service.manager != "supervise":
            alive = True
        fresh = node.files.get("files", {}).get(path) != sha256_text(body)
        unit_changed = "router-unit" in reports[node.name].changed
        agent_changed = "agent-install" in reports[node.name].changed
        try:
            if fresh:
                remote.write(node.host, path, body, "600")
            commands = start_commands(service, running=alive, restart=unit_changed or agent_changed)
            if alive and fresh and not commands:
                commands = reload_commands(service)
            for command in commands:
                ok, _, err = remote.run(node.host, command)
                if not ok:
                    raise ApplyError(f"`{node.name}`: the router did not start: {err.strip()}",
                                     hint=f"read {service.log} on the host.")
        except StackError as err:
            reports[node.name].fail(err.message, err.hint)
            continue
        node.written[path] = sha256_text(body)
        if fresh or commands:
            reports[node.name].changed.append("router")
            changed = True
    return changed

def remove_unused_runtimes(spec: StackSpec, nodes: list[Node], desired: Desired,
                           reports: dict[str, HostReport]) -> None:
    """Remove the runtime versions stack.toml no longer lists (`unused_versions`), last and
    only on hosts that converged: their instances run as desired by now. A version that
    the desired or the last written assignment still names is kept (the agent runs it)."""
    listed = {name: rt.versions for name, rt in spec.runtimes.items()}
    for node in nodes:
        if reports[node.name].error is not None:
            continue  # its instances may still run on a version stack.toml dropped
        told = [*desired.assignments.get(node.name, Assignment(node=node.name)).instances,
                *(node.current.instances if node.current else [])]
        paths = {i.runtime_path for i in told}
        in_use = {(name, v) for name, versions in node.facts.runtimes.items()
                  for v in versions if runtime_path(node.prefix, name, v) in paths}
        for name, stale in unused_versions(node.facts.runtimes, listed, in_use).items():
            ok, _, err = remote.run(node.host, removal_script(node.prefix, name, stale))
            if not ok:
                reports[node.name].fail(
                    f"`{node.name}`: could not remove {name} {', '.join(stale)}: "
                    f"{err.strip()[:300]}",
                    "check the permissions of the prefix; the next `stack apply` tries again.")
                break
            reports[node.name].changed.append(f"removed {name} {', '.join(stale)}")

def write_manifests(plan: Plan, nodes: list[Node], reports: dict[str, HostReport]) -> None:
    """Record on each host what this apply put in place (`state/managed`): the plan's
    fingerprint and the sha256 of the bytes written, for each file it wrote or found up to
    date; a file it did not get to (the host failed first) keeps its old line, or gets
    none, so the next plan shows it again."""
    for node in nodes:
        managed = node.facts.managed or {}
        lines: list[HostFile] = []
        written: dict[str, str] = {}
        for f in plan.files.get(node.name, ()):
            if f.path in node.written or (f.kind == "upload" and node.deployed):
                lines.append(f)
                written[f.path] = node.written.get(f.path, f.fingerprint)
            elif f.path in managed:
                old = managed[f.path]
                lines.append(HostFile(f.address, f.path, old.fingerprint, old.kind))
                written[f.path] = old.written
        text = manifest_text(lines, written)
        path = f"{node.prefix}/{MANIFEST}"
        if node.files.get("files", {}).get(path) == sha256_text(text.encode()):
            continue
        try:
            remote.write(node.host, path, text.encode(), "600")
        except StackError as err:
            reports[node.name].fail(err.message, err.hint)
