"""Monitoring the fleet: a Prometheus scrape config generated from stack.toml and the facts.

    scrape_targets(spec, observed) -> Targets       who to scrape (pure)
    render_scrape_config(targets, token_dir) -> str  the YAML Prometheus reads (pure)

Routers export `/metrics` without a key on the router's listen address; agents export it
on their API address (`agent_port`, default 7070) behind the agent's bearer token, which
differs per node (derived from the stack secret), so each agent gets its own scrape job
that reads its token from `TOKEN_DIR/NODE.token`. All agent jobs carry the label
`job="modelstack-agent"`. Agent jobs keep the agent's own labels (`honor_labels`): its
`instance` label is the model instance id and its `node` label is the node name.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from router.config import is_loopback, parse_listen
from stack.nodes import router_nodes
from stack.snapshot import Observed
from stack.spec import StackSpec

ROUTER_JOB = "modelstack-router"
AGENT_JOB = "modelstack-agent"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Target:
    """One endpoint to scrape: the node it runs on and its `host:port`."""

    node: str
    address: str
    loopback: bool  # only a Prometheus on that node itself can reach it


@dataclass(frozen=True)
class Targets:
    """Every router and agent endpoint of a stack."""

    stack: str
    routers: tuple[Target, ...]
    agents: tuple[Target, ...]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def scrape_targets(spec: StackSpec, observed: Observed) -> Targets:
    """The router and agent endpoints of every node in `observed`, by node name."""
    from stack.assign import node_host
    from stack.hostfiles import agent_listen

    host, port = parse_listen(spec.router.listen)
    routers = []
    for node in router_nodes(spec, observed):
        address = node_host(spec, observed, node) if host in WILDCARD_HOSTS else host
        routers.append(Target(node, _hostport(address, port), is_loopback(address)))
    agents = []
    for node in sorted(observed.nodes):
        agent_host, agent_port = parse_listen(agent_listen(spec, node, observed.nodes[node]))
        agents.append(Target(node, _hostport(agent_host, agent_port), is_loopback(agent_host)))
    return Targets(spec.stack.name, tuple(routers), tuple(agents))


def token_path(token_dir: str, node: str) -> str:
    """Where the scrape job of `node`'s agent reads its bearer token."""
    return posixpath.join(token_dir, f"{node}.token")


def _q(value: str) -> str:
    """A YAML double-quoted scalar (a JSON string is one)."""
    return json.dumps(value)


def _static(target: Target, stack: str, job: str | None) -> list[str]:
    lines = []
    if target.loopback:
        lines.append(f"      # `{target.node}` listens on loopback: only a Prometheus running "
                     "on that host can scrape it")
    lines.append(f"      - targets: [{_q(target.address)}]")
    labels = f"node: {_q(target.node)}, stack: {_q(stack)}"
    if job:
        labels = f"job: {_q(job)}, " + labels
    lines.append(f"        labels: {{{labels}}}")
    return lines


def render_scrape_config(targets: Targets, token_dir: str) -> str:
    """The scrape config as YAML: a whole prometheus.yml, or a `scrape_config_files` entry."""
    out = [
        f"# Prometheus scrape config for the stack `{targets.stack}`, written by "
        "`stack monitoring`.",
        "# Use it as prometheus.yml, or list it under `scrape_config_files` (Prometheus >= 2.43).",
        "# Agent jobs read each agent's bearer token from a file (mode 0600) that holds",
        "# PREFIX/etc/agent.token of that host; `stack monitoring --write-tokens` writes them.",
        "scrape_configs:",
    ]
    if targets.routers:
        out += [f"  - job_name: {_q(ROUTER_JOB)}", "    metrics_path: /metrics",
                "    static_configs:"]
        for target in targets.routers:
            out += _static(target, targets.stack, None)
    for target in targets.agents:
        out += [
            f"  - job_name: {_q(AGENT_JOB + '-' + target.node)}",
            "    metrics_path: /metrics",
            "    honor_labels: true  # keep the agent's `node` and `instance` (model instance id)",
            "    authorization:",
            "      type: Bearer",
            f"      credentials_file: {_q(token_path(token_dir, target.node))}",
            "    static_configs:",
        ]
        out += _static(target, targets.stack, AGENT_JOB)
    if not targets.routers and not targets.agents:
        out[-1] = "scrape_configs: []"
    return "\n".join(out) + "\n"


__all__ = ["AGENT_JOB", "ROUTER_JOB", "Target", "Targets", "render_scrape_config",
           "scrape_targets", "token_path"]
