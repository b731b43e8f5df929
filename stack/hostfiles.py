"""The files `stack apply` writes on each host, with their plan addresses and fingerprints.

Plan and apply both start here, so they compare the same two values: the plan derives a
change wherever a desired file's fingerprint differs from the one the host's facts report
(`NodeFacts.managed`, read from `PREFIX/state/managed`, which apply writes last), or where
the file is gone or was changed on the host since. A fingerprint never needs a secret:
content that holds one (the agent token, the router config's backend keys) is
fingerprinted without it, so CI can plan with no secret at hand.

    node.N.agent.config  etc/agent.toml         node.N.agent.unit   the agent's service
    node.N.agent.token   etc/agent.token        node.N.router.unit  the router's service
    router               etc/router.json (parts: keys, models, settings)
    model.M.files        an uploaded `local://` model (its content's sha256)
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Literal

from agent.assignment import Assignment
from deploys.probe import dumps
from deploys.services import Service, render, unit_file
from deploys.steps import agent_paths, sha256_text
from router.config import RouterConfig
from stack.assign import keyless_router_body
from stack.nodes import node_prefix, node_settings
from stack.snapshot import NodeFacts
from stack.spec import StackSpec

AGENT_PORT = 7070
MANIFEST = "state/managed"  # under the prefix: "KIND FINGERPRINT SHA256 PATH" per line


@dataclass(frozen=True)
class HostFile:
    """One file apply keeps on a host: where, under which plan address, and its
    fingerprint (`part:sha,part:sha` for a file whose parts change on their own)."""

    address: str
    path: str
    fingerprint: str
    kind: Literal["file", "upload"] = "file"

    def parts(self) -> dict[str, str]:
        """The fingerprint by part (one part, `""`, for most files)."""
        if ":" not in self.fingerprint:
            return {"": self.fingerprint}
        return dict(p.split(":", 1) for p in self.fingerprint.split(","))

    def to_json(self) -> dict[str, str]:
        return {"address": self.address, "path": self.path, "fingerprint": self.fingerprint,
                "kind": self.kind}


def agent_service(spec: StackSpec, prefix: str, manager: str) -> Service:
    return Service("agent", spec.stack.name, prefix,
                   (f"{prefix}/agent/venv/bin/stack-agent", "--config", f"{prefix}/etc/agent.toml"),
                   manager)


def router_service(spec: StackSpec, prefix: str, manager: str) -> Service:
    return Service("router", spec.stack.name, prefix,
                   (f"{prefix}/agent/venv/bin/stack-router", "--config",
                    f"{prefix}/etc/router.json"), manager)


def agent_port(spec: StackSpec, node: str) -> int:
    """The port of the agent's API on `node`: its `agent_port`, default 7070."""
    return node_settings(spec, node).agent_port or AGENT_PORT


def agent_listen(spec: StackSpec, node: str, facts: NodeFacts) -> str:
    """The agent's API address: the node's address, its `agent_port` (default 7070)."""
    address = node_settings(spec, node).address or facts.address or "127.0.0.1"
    return f"{address}:{agent_port(spec, node)}"


def render_agent_toml(spec: StackSpec, node: str, listen: str, prefix: str) -> str:
    """agent.toml; `[agent]` settings that differ from the defaults go to `[tuning]`."""
    tuning = spec.agent.model_dump(exclude_defaults=True)
    return render("agent.toml.j2", node=node, listen=listen,
                  token_file=f"{prefix}/etc/agent.token", prefix=prefix, tuning=tuning)


def router_body(config: RouterConfig) -> bytes:
    """router.json as apply writes it (canonical JSON: stable bytes, stable hashes)."""
    return dumps(config.model_dump(mode="json")).encode()


def router_fingerprint(config: RouterConfig) -> str:
    """`keys:H,models:H,settings:H` of a router config, the backends' keys left out."""
    body = keyless_router_body(config)
    parts = {"keys": body.pop("keys"), "models": body.pop("models"), "settings": body}
    return ",".join(f"{name}:{_digest(value)}" for name, value in parts.items())


def _digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return sha256_text(text.encode())[:16]


@functools.lru_cache(maxsize=256)
def unit_sha256(service: Service) -> str:
    """The sha256 of a service's unit file (the same for every node with one prefix)."""
    return sha256_text(unit_file(service).encode())


def token_fingerprint(node: str) -> str:
    """The agent token is derived from the stack secret for `agent:NODE`: its fingerprint
    is that purpose (a new secret is not seen by the plan; see docs/plan.md)."""
    return sha256_text(f"agent-token:agent:{node}".encode())[:16]


def desired_files(spec: StackSpec, node: str, facts: NodeFacts, assignment: Assignment,
                  router: str | None) -> list[HostFile]:
    """Every file apply keeps on `node`; `router`: the router config's fingerprint
    (`router_fingerprint`, made once for the fleet) when this node serves the router."""
    prefix = node_prefix(spec, node)
    manager = facts.service_manager or "supervise"
    paths = agent_paths(prefix)
    toml = render_agent_toml(spec, node, agent_listen(spec, node, facts), prefix)
    agent = agent_service(spec, prefix, manager)
    out = [
        HostFile(f"node.{node}.agent.config", paths["agent_toml"], sha256_text(toml.encode())),
        HostFile(f"node.{node}.agent.token", paths["agent_token"], token_fingerprint(node)),
        HostFile(f"node.{node}.agent.unit", agent.unit_path, unit_sha256(agent)),
    ]
    if router is not None:
        service = router_service(spec, prefix, manager)
        out.append(HostFile(f"node.{node}.router.unit", service.unit_path,
                            unit_sha256(service)))
        out.append(HostFile("router", paths["router_json"], router))
    uploads: dict[str, HostFile] = {}
    for inst in assignment.instances:
        if inst.source_sha256 and inst.model_path and inst.source.startswith("local://"):
            uploads[inst.model_path] = HostFile(f"model.{inst.model}.files", inst.model_path,
                                                inst.source_sha256, "upload")
    return out + [uploads[k] for k in sorted(uploads)]


def manifest_text(files: list[HostFile], written: dict[str, str]) -> str:
    """`state/managed`: one line per file, with the sha256 of the bytes apply wrote
    (`written`, by path; an upload's is its content sha256)."""
    return "".join(f"{f.kind} {f.fingerprint} {written[f.path]} {f.path}\n" for f in files)
