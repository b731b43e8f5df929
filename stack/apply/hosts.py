"""The hosts apply works on (`Node`): their facts, which it can manage, their lock and state."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gevent

from agent.assignment import Assignment
from deploys.probe import HostState, host_files_script, parse_host_files
from deploys.steps import agent_paths
from stack import lock as locks
from stack import remote
from stack.apply.report import HostReport
from stack.errors import ApplyError
from stack.nodes import node_prefix
from stack.plan import Plan
from stack.snapshot import NodeFacts, Observed
from stack.spec import StackSpec

if TYPE_CHECKING:
    from pyinfra.api.host import Host

    from stack.observe import Connected


@dataclass
class Node:
    """One reachable host during apply."""

    name: str
    host: Host
    prefix: str
    facts: NodeFacts
    probed: HostState = field(default_factory=HostState)
    current: Assignment | None = None
    manager: str = "supervise"
    # what this apply knows is in place on the host (state/managed records only that):
    # the files it wrote or found up to date (path -> sha256), and whether its deploy
    # steps (agent files, units, uploads) all succeeded
    written: dict[str, str] = field(default_factory=dict)
    deployed: bool = False


def read_fleet(spec: StackSpec, connected: Connected) -> Observed:
    """The facts of every connected host, read in parallel."""
    from stack.observe import read_node

    facts: dict[str, NodeFacts] = {}

    def read(name: str) -> None:
        facts[name] = read_node(spec, connected, name)

    gevent.joinall([gevent.spawn(read, n) for n in connected.nodes])
    return Observed(nodes={n: facts[n] for n in connected.nodes})


def unmanageable(name: str, facts: NodeFacts) -> tuple[str, str] | None:
    """(reason, hint) when apply cannot work on this host: unreachable, or not POSIX."""
    if facts.os == "windows":
        return (f"`{name}` runs Windows, which pyinfra 3 cannot manage",
                "remove it from the stack, or serve from a Linux VM (or WSL with an SSH "
                "server) on it.")
    if not facts.reachable or facts.error:
        return facts.error or f"`{name}` is unreachable", facts.hint or ""
    if facts.os not in ("linux", "darwin"):
        return (f"`{name}` runs {facts.os}, which modelstack does not manage",
                "use a Linux or macOS host.")
    return None


def manageable(spec: StackSpec, connected: Connected, observed: Observed,
               reports: dict[str, HostReport]) -> list[Node]:
    """The hosts apply can work on; every host gets a report, the others with the reason."""
    nodes: list[Node] = []
    for name, facts in observed.nodes.items():
        report = reports.setdefault(name, HostReport(name))
        problem = unmanageable(name, facts)
        if problem is not None:
            report.fail(*problem)
            continue
        nodes.append(Node(name, connected.nodes[name], node_prefix(spec, name), facts))
    return nodes


def leave_conflicts(nodes: list[Node], plan: Plan, reports: dict[str, HostReport]
                    ) -> list[Node]:
    """The hosts without the plan's conflicts: where another stack collides with this
    one, apply writes nothing (each such host is reported with the reason)."""
    for conflict in plan.conflicts:
        reports[conflict.node].fail(conflict.error, conflict.hint)
    refused = {c.node for c in plan.conflicts}
    return [n for n in nodes if n.name not in refused]


def host_probe(node: Node, lock: locks.LockInfo, extra_files: list[str],
               sidecars: list[str]) -> None:
    """Take the host lock and read what apply wrote last time (one round trip)."""
    paths = agent_paths(node.prefix)
    services = [f"{node.prefix}/run/{name}.supervisor.pid" for name in ("agent", "router")]
    files = [paths["agent_toml"], paths["agent_token"], paths["router_json"],
             paths["assignment"], *extra_files]
    script = (locks.host_acquire_script(node.prefix, lock) + "\n"
              + host_files_script(node.prefix, files, [paths["bundle"], *sidecars], services)
              + f"\necho assignment-json; cat {shlex.quote(paths['assignment'])} 2>/dev/null "
              "| tr -d '\\n'; echo")
    ok, out, err = remote.run(node.host, script)
    if not ok:
        raise ApplyError(f"`{node.name}`: could not read the host's state: {err.strip()[:300]}",
                         hint="check the prefix's permissions and free disk space.")
    lines = out.splitlines()
    locks.check_host_lock(out, node.name)
    node.probed = parse_host_files(lines)
    node.manager = node.probed.manager
    if "assignment-json" in lines:
        text = lines[lines.index("assignment-json") + 1:]
        try:
            node.current = Assignment.model_validate_json(text[0]) if text and text[0] else None
        except ValueError:
            node.current = None


def release_host_locks(nodes: list[Node], lock_id: str) -> None:
    def one(node: Node) -> None:
        try:
            remote.run(node.host, locks.host_release_script(node.prefix, lock_id))
        except Exception:  # a host that died mid-apply keeps its lock: force-unlock
            return

    jobs = [gevent.spawn(one, n) for n in nodes]
    gevent.joinall(jobs, timeout=30)
