"""Per-node settings: the `[nodes."PATTERN"]` tables that apply to a host, merged."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
