"""Other stacks on the same host: which of them this stack would collide with.

`stack apply` records every stack it installs on a host, as the SSH user, in
`~/.config/modelstack/stacks/NAME` (its prefix, its agent's port and on a router host its
router's, written with agent.toml: `deploys.steps.record_commands`; `stack destroy`
removes it), and the facts list those records (`NodeFacts.stacks`). Two stacks on one
host must not share a port (the second agent or router would not start), and neither
prefix may hold the other's (one would stop or remove the other's services and files).
A host where this stack collides with another is left out of the plan: nothing is placed
or written there, and `stack plan` and `stack apply` exit 1 with the reason.
"""

from __future__ import annotations

from stack.hostfiles import agent_port
from stack.nodes import node_prefix, router_host
from stack.plan import HostProblem
from stack.snapshot import NodeFacts, Observed, StackOnHost
from stack.spec import StackSpec


def own_record(spec: StackSpec, node: str) -> StackOnHost:
    """The record this stack keeps on `node`."""
    return StackOnHost(name=spec.stack.name, prefix=node_prefix(spec, node),
                       agent_port=agent_port(spec, node), router_port=_router_port(spec, node))


def _router_port(spec: StackSpec, node: str) -> int | None:
    """The port of `[router] listen` when `node` is a router host (as the scheduler picks
    them: a glob of `router.hosts` matches, or there are none)."""
    if not router_host(spec, node):
        return None
    port = spec.router.listen.rpartition(":")[2]
    return int(port) if port.isdigit() else None


def _ports(record: StackOnHost) -> list[tuple[str, int]]:
    return [("agent", record.agent_port)] + (
        [("router", record.router_port)] if record.router_port else [])


def overlaps(a: str, b: str) -> bool:
    """Whether two prefixes are the same folder or one holds the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def node_conflicts(spec: StackSpec, node: str, facts: NodeFacts,
                   ports: bool = True) -> list[HostProblem]:
    """Where this stack collides with another one recorded on `node` (`ports`: the
    agent's port too, not only the prefixes)."""
    ours = own_record(spec, node)
    pattern = f'`[nodes."{node}"]'
    out: list[HostProblem] = []
    for other in facts.stacks or []:
        if other.name == ours.name:
            if other.prefix != ours.prefix:
                out.append(HostProblem(
                    node, f"stack `{other.name}` is already installed here in {other.prefix}",
                    f"a host holds a stack once: set {pattern} prefix` back to "
                    f"\"{other.prefix}\", or run `stack destroy` with that prefix first."))
            continue
        if overlaps(other.prefix, ours.prefix):
            out.append(HostProblem(
                node, f"stack `{other.name}` is installed in {other.prefix}, "
                + _where(other.prefix, ours.prefix),
                f"give this stack a folder of its own: {pattern} prefix` (or "
                f"`[stack] prefix`), or `stack destroy` the stack `{other.name}` first."))
        for mine, port in _ports(ours) if ports else []:
            for theirs, used in _ports(other):
                if used != port:
                    continue
                key = (f"{pattern} agent_port`" if mine == "agent"
                       else "`[router] listen`")
                out.append(HostProblem(
                    node, f"stack `{other.name}` already uses {theirs} port {used} "
                    f"(prefix {other.prefix})",
                    f"give this stack's {mine} another port: {key} in stack.toml, or "
                    f"`stack destroy` the stack `{other.name}` first."))
    return out


def _where(theirs: str, ours: str) -> str:
    if theirs == ours:
        return "the same prefix as this stack's"
    if ours.startswith(theirs + "/"):
        return f"which holds this stack's prefix {ours}"
    return f"inside this stack's prefix {ours}"


def conflicts(spec: StackSpec, observed: Observed) -> tuple[HostProblem, ...]:
    """Every reachable host where this stack collides with another, with the reason."""
    return tuple(c for name, facts in sorted(observed.nodes.items()) if facts.reachable
                 for c in node_conflicts(spec, name, facts))


def set_aside(observed: Observed, refused: tuple[HostProblem, ...]) -> Observed:
    """The fleet without the hosts this stack may not touch (nothing is planned there)."""
    if not refused:
        return observed
    names = {c.node for c in refused}
    return observed.model_copy(update={"nodes": {
        name: facts for name, facts in observed.nodes.items() if name not in names}})
