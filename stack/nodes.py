"""Per-node settings: the `[nodes."PATTERN"]` tables that apply to a host, merged."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stack.snapshot import Observed
    from stack.spec import NodeSpec, StackSpec


def node_settings(spec: StackSpec, node: str) -> NodeSpec:
    """The `[nodes."PATTERN"]` settings of a node (merged by `stack.config`), computed once
    per loaded stack.toml and set of matching patterns (a fleet of thousands of nodes has a
    handful of them), and looked up by the node's name after its first time."""
    from stack.config import node_settings as merged

    cache = spec._node_settings
    found = cache.get((node,))  # by name: planning asks for each node many times
    if found is None:
        key = (tuple(p for p in spec.nodes if fnmatchcase(node, p)),
               node if node in spec.hosts else None)
        if key not in cache:
            cache[key] = merged(spec, node)
        found = cache[(node,)] = cache[key]
    return found


def node_prefix(spec: StackSpec, node: str) -> str:
    """The install prefix on `node`, without a trailing slash."""
    return (node_settings(spec, node).prefix or spec.stack.prefix).rstrip("/")


def router_host(spec: StackSpec, node: str) -> bool:
    """Whether `[router] hosts` takes `node`: a glob of it matches, or it names none."""
    return not spec.router.hosts or any(fnmatchcase(node, g) for g in spec.router.hosts)


def router_nodes(spec: StackSpec, observed: Observed) -> list[str]:
    """The nodes running a router (`router_host`), by name; never one no agent can be
    installed on (`stack.bundle_target.agent_problem`: the router is in its bundle)."""
    from stack.bundle_target import agent_problem

    return [n for n in sorted(observed.nodes)
            if router_host(spec, n) and agent_problem(observed.nodes[n]) is None]
