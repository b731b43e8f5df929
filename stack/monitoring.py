"""Monitoring the fleet: a Prometheus scrape config generated from stack.toml and the facts.

    scrape_targets(spec, observed) -> Targets       who to scrape (pure)
    render_scrape_config(targets, token_dir, ...) -> str  the YAML Prometheus reads (pure)

stack.alerts renders the alerting rules that prometheus.yml loads.

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


def yaml_quote(value: str) -> str:
    """A YAML double-quoted scalar (a JSON string is one; so is it a PromQL string)."""
    return json.dumps(value)


def _static(target: Target, stack: str, job: str | None) -> list[str]:
    lines = []
    if target.loopback:
        lines.append(f"      # `{target.node}` listens on loopback: only a Prometheus running "
                     "on that host can scrape it")
    lines.append(f"      - targets: [{yaml_quote(target.address)}]")
    labels = f"node: {yaml_quote(target.node)}, stack: {yaml_quote(stack)}"
    if job:
        labels = f"job: {yaml_quote(job)}, " + labels
    lines.append(f"        labels: {{{labels}}}")
    return lines


def render_scrape_config(targets: Targets, token_dir: str, rule_files: tuple[str, ...] = (),
                         interval_seconds: int | None = None) -> str:
    """The scrape config as YAML: a whole prometheus.yml loading `rule_files` (relative to
    it), or without rule files a `scrape_config_files` entry; with `interval_seconds`, a
    `global:` section sets the scrape and rule evaluation interval."""
    out = [
        f"# Prometheus config for the stack `{targets.stack}`, written by `stack monitoring`.",
        "# Use it as prometheus.yml; to merge it into your own, copy its `scrape_configs`",
        "# entries and list the rule files under your `rule_files`.",
        "# Agent jobs read each agent's bearer token from a file (mode 0600) that holds",
        "# PREFIX/etc/agent.token of that host; `stack monitoring --write-tokens` writes them.",
    ]
    if interval_seconds is not None:
        out += ["global:", f"  scrape_interval: {yaml_quote(f'{interval_seconds}s')}",
                f"  evaluation_interval: {yaml_quote(f'{interval_seconds}s')}"]
    if rule_files:
        out += ["rule_files:"] + [f"  - {yaml_quote(path)}" for path in rule_files]
    out.append("scrape_configs:")
    if targets.routers:
        out += [f"  - job_name: {yaml_quote(ROUTER_JOB)}", "    metrics_path: /metrics",
                "    static_configs:"]
        for target in targets.routers:
            out += _static(target, targets.stack, None)
    for target in targets.agents:
        out += [
            f"  - job_name: {yaml_quote(AGENT_JOB + '-' + target.node)}",
            "    metrics_path: /metrics",
            "    honor_labels: true  # keep the agent's `node` and `instance` (model instance id)",
            "    authorization:",
            "      type: Bearer",
            f"      credentials_file: {yaml_quote(token_path(token_dir, target.node))}",
            "    static_configs:",
        ]
        out += _static(target, targets.stack, AGENT_JOB)
    if not targets.routers and not targets.agents:
        out[-1] = "scrape_configs: []"
    return "\n".join(out) + "\n"


__all__ = ["AGENT_JOB", "ROUTER_JOB", "Target", "Targets", "render_scrape_config",
           "scrape_targets", "token_path", "yaml_quote"]
