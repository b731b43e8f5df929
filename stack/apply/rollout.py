"""The rolling update of the assignments: new instances beside the old, ready before the old go."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import gevent

from agent.assignment import Assignment, Instance
from deploys.facts import agent_status_body, facts_command
from deploys.probe import dumps
from deploys.steps import agent_paths, sha256_text
from stack import remote
from stack.apply.desired import Desired
from stack.apply.hosts import Node
from stack.apply.report import ApplyOptions, HostReport
from stack.errors import StackError


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
    return desired.model_copy(update={"instances": sorted(chosen.values(), key=lambda i: i.id)})


def _write_assignment(node: Node, assignment: Assignment) -> bool:
    """Write assignment.json if it differs; the agent picks the change up itself."""
    body = dumps(assignment.model_dump(mode="json")).encode()
    path = agent_paths(node.prefix)["assignment"]
    if node.probed.files.get(path) == sha256_text(body):
        return False
    remote.write(node.host, path, body, "600")
    node.probed.files[path] = sha256_text(body)
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
