"""The plan: what `stack apply` would change, as a frozen value (`plan(...) -> Plan`).

Compares the desired state (placements turned into assignments and a router config)
with the observed one (the facts) and lists changes: hosts (drivers, reboots, the agent,
runtimes), model replicas (create, replace with its reason, delete), the router. The plan
decides nothing by itself; `render` shows it and `apply` carries it out. Its JSON form
(`Plan.to_json`) is a public contract (docs/plan.md, "JSON"), with what apply needs to
rebuild the assignments (placements with runtime, vendor, context and workers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.assignment import Assignment, Instance
from deploys.drivers import Blocked, DriverRequest, driver_commands, needs_reboot
from deploys.runtimes import unused_versions
from stack.assign import build_router_config, router_config_sha256
from stack.errors import ConfigError
from stack.hostfiles import HostFile, desired_files, router_fingerprint
from stack.nodes import node_settings
from stack.placement import (
    Placement,
    Placements,
    RunningPart,
    Unschedulable,
    gib,
    instance_id,
    running_replicas,
)
from stack.snapshot import ManagedFile, NodeFacts, Observed
from stack.spec import StackSpec

FORMAT_VERSION = 1
# facts that change from one reading to the next without anything to converge
VOLATILE_OBSERVED = ("collected_at",)
# other programs open and close ports and write files all the time (apply checks the
# disk again itself before it uploads anything)
VOLATILE_NODE = ("ports_in_use", "disk_free_bytes")
VOLATILE_GPU = ("utilization_percent", "temperature_c", "power_w", "memory_used_bytes")
VOLATILE_INSTANCE = ("state", "restarts", "last_error", "pid", "progress", "adopted",
                     "started_at", "last_exit_code", "last_log_lines")


class Action(StrEnum):
    """What a change does; the value is the JSON word, `symbol` what the plan shows."""

    CREATE = "create"
    UPDATE = "update"
    REPLACE = "replace"
    DELETE = "delete"

    @property
    def symbol(self) -> str:
        return {"create": "+", "update": "~", "replace": "-/+", "delete": "-"}[self.value]


@dataclass(frozen=True)
class Change:
    """One thing apply would do. `details` are (label, value) lines for the renderer."""

    address: str
    action: Action
    reason: str
    disruption: str = "none"  # none | restart | reboot
    node: str | None = None
    details: tuple[tuple[str, str], ...] = ()
    hint: str = ""  # what to do first, when apply cannot do it (a blocked driver)

    def to_json(self) -> dict[str, Any]:
        data = {"address": self.address, "action": self.action.value, "reason": self.reason,
                "disruption": self.disruption, "node": self.node,
                "details": [list(d) for d in self.details]}
        if self.hint:
            data["hint"] = self.hint
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Change:
        return Change(address=data["address"], action=Action(data["action"]),
                      reason=data.get("reason", ""), disruption=data.get("disruption", "none"),
                      node=data.get("node"),
                      details=tuple((str(a), str(b)) for a, b in data.get("details", [])),
                      hint=str(data.get("hint", "")))


@dataclass(frozen=True)
class Summary:
    """Counts as Terraform counts them: a replace is one add and one destroy."""

    add: int = 0
    change: int = 0
    destroy: int = 0

    @staticmethod
    def of(changes: tuple[Change, ...]) -> Summary:
        add = sum(c.action in (Action.CREATE, Action.REPLACE) for c in changes)
        change = sum(c.action is Action.UPDATE for c in changes)
        destroy = sum(c.action in (Action.DELETE, Action.REPLACE) for c in changes)
        return Summary(add, change, destroy)


@dataclass(frozen=True)
class Unreachable:
    """A host whose facts could not be read: apply cannot touch it, and what runs there
    is unknown (its replicas are placed again on the hosts that answered)."""

    node: str
    error: str
    hint: str = ""

    def to_json(self) -> dict[str, str]:
        return {"node": self.node, "error": self.error, "hint": self.hint}


@dataclass(frozen=True)
class Plan:
    """Everything `stack apply` would do, and the placements it would apply."""

    stack_sha256: str
    facts_sha256: str
    changes: tuple[Change, ...]
    placements: Placements
    router_config_sha256: str = ""
    summary: Summary = field(default_factory=Summary)
    format_version: int = FORMAT_VERSION
    unreachable: tuple[Unreachable, ...] = ()
    # the desired state apply writes: per node, its files (fingerprints, no secrets)
    files: Mapping[str, tuple[HostFile, ...]] = field(default_factory=dict)
    # per node, the instances it must run (API keys left out: apply fills them in)
    assignments: Mapping[str, Assignment] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def unschedulable(self) -> tuple[Unschedulable, ...]:
        return self.placements.unschedulable

    def has_changes(self) -> bool:
        return bool(self.changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "stack_sha256": self.stack_sha256,
            "facts_sha256": self.facts_sha256,
            "changes": [c.to_json() for c in self.changes],
            "placements": [p.to_json() for p in self.placements.placements],
            "kept": [p.to_json() for p in self.placements.kept],
            "unknown": [{"model": m, "reason": r} for m, r in self.placements.unknown],
            "warnings": list(self.warnings),
            "files": {node: [f.to_json() for f in files]
                      for node, files in sorted(self.files.items())},
            "assignments": {node: a.model_dump(mode="json", exclude={"format_version"})
                            for node, a in sorted(self.assignments.items())},
            "unschedulable": [u.to_json() for u in self.placements.unschedulable],
            "summary": {"add": self.summary.add, "change": self.summary.change,
                        "destroy": self.summary.destroy},
            "routers": list(self.placements.routers),
            "router_config_sha256": self.router_config_sha256,
            "unreachable": [u.to_json() for u in self.unreachable],
        }

    @staticmethod
    def from_json(data: Mapping[str, Any], where: str = "the plan file") -> Plan:
        """A saved plan (`stack plan --out`) read back; ConfigError when it is not one."""
        if data.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"`{where}` has plan format {data.get('format_version')!r}, this stack "
                f"reads format {FORMAT_VERSION}",
                hint="make the plan again with this version: `stack plan --out PLAN`.")
        try:
            placements = Placements(
                tuple(Placement.from_json(p) for p in data["placements"]),
                tuple(Unschedulable.from_json(u) for u in data.get("unschedulable", [])),
                tuple(data.get("routers", [])),
                tuple(Placement.from_json(p) for p in data.get("kept", [])),
                tuple((str(u["model"]), str(u["reason"])) for u in data.get("unknown", [])))
            changes = tuple(Change.from_json(c) for c in data["changes"])
            files = {str(node): tuple(HostFile(str(f["address"]), str(f["path"]),
                                               str(f["fingerprint"]), f.get("kind", "file"))
                                      for f in items)
                     for node, items in data.get("files", {}).items()}
            return Plan(stack_sha256=data["stack_sha256"], facts_sha256=data["facts_sha256"],
                        changes=changes, placements=placements,
                        router_config_sha256=data.get("router_config_sha256", ""),
                        summary=Summary.of(changes),
                        unreachable=tuple(Unreachable(str(u["node"]), str(u["error"]),
                                                      str(u.get("hint", "")))
                                          for u in data.get("unreachable", [])),
                        files=files, warnings=tuple(str(w) for w in data.get("warnings", [])),
                        assignments={str(node): Assignment.model_validate(a)
                                     for node, a in data.get("assignments", {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"`{where}` is not a plan written by `stack plan --out`: "
                              f"missing or bad {exc}",
                              hint="make it again with `stack plan --out PLAN`.") from exc


# --------------------------------------------------------------------------- hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_facts(observed: Observed) -> dict[str, Any]:
    """The facts without what changes between two readings (clock, utilization,
    temperatures, memory in use, instance states): a re-read fleet hashes the same."""
    data = observed.model_dump(mode="json")
    for key in VOLATILE_OBSERVED:
        data.pop(key, None)
    for node in data.get("nodes", {}).values():
        for key in VOLATILE_NODE:
            node.pop(key, None)
        for gpu in node.get("gpus", []):
            for key in VOLATILE_GPU:
                gpu.pop(key, None)
        for inst in (node.get("agent") or {}).get("instances", []):
            for key in VOLATILE_INSTANCE:
                inst.pop(key, None)
    return data


def facts_sha256(observed: Observed) -> str:
    """sha256 of the canonical facts JSON (sorted keys, no spaces); apply compares it."""
    text = json.dumps(canonical_facts(observed), sort_keys=True, separators=(",", ":"))
    return sha256_bytes(text.encode())


# --------------------------------------------------------------------------- addresses


def replica_address(model: str, replica: int) -> str:
    return f"model.{model}.replica[{replica}]"


def _placement_details(p: Placement) -> tuple[tuple[str, str], ...]:
    gpus = ", ".join(map(str, p.gpus)) if p.gpus else "none (CPU)"
    out = [("node", p.node), ("gpus", f"{p.vendor} {gpus}" if p.gpus else gpus),
           ("backend", f"{p.backend} {p.backend_version or ''}".strip()),
           ("port", str(p.port))]
    claim = f"{gib(p.claim.ram_bytes)} RAM"
    if p.gpus:
        claim = f"{gib(p.claim.vram_bytes_per_gpu)} per GPU, " + claim
    out.append(("claim", claim))
    if p.split:
        out.append(("layers", " / ".join(map(str, p.split)) + " (per device, by free memory)"))
    for k, w in enumerate(p.workers, start=1):
        wg = ", ".join(map(str, w.gpus)) if w.gpus else "CPU"
        out.append((f"worker {k}", f"{w.node} gpus {wg} port {w.port}"))
    return tuple(out)


# --------------------------------------------------------------------------- host changes


def _host_changes(spec: StackSpec, observed: Observed, placements: Placements,
                  agent_version: str) -> list[Change]:
    needed: dict[str, dict[tuple[str, str], list[str]]] = {}
    for p in (*placements.placements, *placements.kept):
        if not p.runtime or not p.backend_version:
            continue
        for node in p.nodes():
            users = needed.setdefault(node, {}).setdefault((p.runtime, p.backend_version), [])
            users.append(replica_address(p.model, p.replica))
    out: list[Change] = []
    for name in sorted(observed.nodes):
        facts = observed.nodes[name]
        if not facts.reachable:
            continue
        out.extend(_driver_changes(spec, name, facts))
        if facts.reboot_required:
            out.append(Change(f"node.{name}.reboot", Action.UPDATE,
                              "the node reports that a reboot is required", "reboot", name))
        agent = facts.agent
        if agent.version is None:
            out.append(Change(f"node.{name}.agent", Action.CREATE,
                              f"install the agent {agent_version}", "none", name))
        elif agent.version != agent_version:
            out.append(Change(f"node.{name}.agent", Action.UPDATE,
                              f"agent {agent.version} -> {agent_version}", "none", name))
        elif not agent.running:
            out.append(Change(f"node.{name}.agent", Action.UPDATE,
                              "the agent is not running", "none", name))
        out.extend(_runtime_changes(spec, name, facts, needed.get(name, {})))
    return out


def _driver_changes(spec: StackSpec, name: str, facts: NodeFacts) -> list[Change]:
    """The driver work apply would do on this node: the same decision apply runs
    (`deploys.drivers.driver_commands`), so plan and apply never disagree."""
    out: list[Change] = []
    user = facts.user or None
    for vendor, driver in sorted(node_settings(spec, name).drivers.items()):
        request = DriverRequest(name, vendor, driver.mode, driver.version, user)
        result = driver_commands(facts, request)
        address = f"node.{name}.driver.{vendor}"
        if isinstance(result, Blocked):
            out.append(Change(address, Action.UPDATE, f"blocked: {result.reason}", "none", name,
                              hint=result.hint))
        elif result:
            have = sorted({g.driver for g in facts.gpus if g.vendor == vendor and g.driver})
            disruption = "reboot" if needs_reboot(facts, result) else "none"
            if have:
                out.append(Change(address, Action.UPDATE,
                                  f"{vendor} driver {', '.join(have)} -> "
                                  f"{driver.version or 'the pinned branch'}", disruption, name))
            else:
                what = f"install the {vendor} driver {driver.version or ''}".rstrip()
                out.append(Change(address, Action.CREATE, what, disruption, name))
    return out


def _runtime_changes(spec: StackSpec, name: str, facts: NodeFacts,
                     needed: dict[tuple[str, str], list[str]]) -> list[Change]:
    out: list[Change] = []
    for (runtime, version), users in sorted(needed.items()):
        if version in facts.runtimes.get(runtime, []):
            continue
        more = f" and {len(users) - 1} more" if len(users) > 1 else ""
        out.append(Change(f"node.{name}.runtime.{runtime}@{version}", Action.CREATE,
                          f"needed by {users[0]}{more}", "none", name))
    # what apply removes last: the same decision (`deploys.runtimes.unused_versions`)
    listed = {n: rt.versions for n, rt in spec.runtimes.items()}
    for runtime, versions in unused_versions(facts.runtimes, listed, needed).items():
        for version in versions:
            why = (f"`runtimes.{runtime}.versions` no longer lists {version}"
                   if runtime in spec.runtimes
                   else f"`runtimes.{runtime}` is no longer in stack.toml")
            out.append(Change(f"node.{name}.runtime.{runtime}@{version}", Action.DELETE, why,
                              "none", name))
    return out


# --------------------------------------------------------------------------- instances


def _replace_reasons(p: Placement, want: dict[str, tuple[str, Instance]],
                     have: dict[str, RunningPart], observed: Observed) -> list[str]:
    reasons: list[str] = []
    main = have.get(p.id)
    if main is None:
        return ["its main instance is missing"]
    if main.node != p.node:
        down = observed.nodes.get(main.node)
        why = " (unreachable)" if down is not None and not down.reachable else ""
        reasons.append(f"moved from {main.node}{why} to {p.node}")
    moved = set(want) != set(have) or any(have[i].node != want[i][0] for i in want if i in have)
    if moved and not reasons:
        reasons.append(f"spans {len(want)} node(s), ran on {len(have)}"
                       if len(want) != len(have) else "a worker moved")
    if main.facts.backend != p.backend:
        reasons.append(f"backend {main.facts.backend} -> {p.backend}")
    elif main.facts.backend_version != p.backend_version:
        reasons.append(f"new version {main.facts.backend_version} -> {p.backend_version}")
    if main.node == p.node and tuple(main.facts.gpus) != p.gpus:
        old = ", ".join(map(str, main.facts.gpus)) or "CPU"
        reasons.append(f"GPUs {old} -> {', '.join(map(str, p.gpus)) or 'CPU'}")
    if main.node == p.node and main.facts.port != p.port:
        reasons.append(f"port {main.facts.port} -> {p.port}")
    if not reasons:
        for iid, (_, inst) in sorted(want.items()):
            facts = have[iid].facts
            if facts.spec_hash is not None and facts.spec_hash != inst.spec_hash():
                files = facts.source_sha256 is not None \
                    and facts.source_sha256 != inst.source_sha256
                reasons.append("model files changed" if files else "args changed")
                break
    return reasons


def _instance_changes(spec: StackSpec, observed: Observed, placements: Placements,
                      assignments: Mapping[str, Assignment]) -> list[Change]:
    desired: dict[str, tuple[str, Instance]] = {
        inst.id: (node, inst) for node, a in assignments.items() for inst in a.instances}
    current, loose = running_replicas(observed)
    out: list[Change] = []
    placed = {(p.model, p.replica) for p in (*placements.placements, *placements.kept)}
    # an unreachable host reports nothing: a replica that ran there looks new
    down = sorted(name for name, facts in observed.nodes.items() if not facts.reachable)
    new = (f"not running on a reachable node; {', '.join(down)} "
           f"{'is' if len(down) == 1 else 'are'} unreachable" if down else "new replica")
    for p in placements.placements:
        ids = [p.id, *(p.worker_id(k) for k in range(1, len(p.workers) + 1))]
        want = {i: desired[i] for i in ids if i in desired}
        have = current.get((p.model, p.replica), {})
        address = replica_address(p.model, p.replica)
        details = _placement_details(p)
        if not have:
            out.append(Change(address, Action.CREATE, new, "none", p.node, details))
            continue
        reasons = _replace_reasons(p, want, have, observed)
        if reasons:
            out.append(Change(address, Action.REPLACE, "; ".join(reasons), "restart", p.node,
                              details))
    unschedulable = {(u.model, u.replica) for u in placements.unschedulable}
    for key in sorted(set(current) - placed):
        model, replica = key
        parts = current[key]
        main = parts.get(instance_id(model, replica)) or next(iter(parts.values()))
        if model not in spec.models:
            why = f"model `{model}` is no longer in stack.toml"
        elif replica >= spec.models[model].replicas:
            why = f"`models.{model}.replicas` is {spec.models[model].replicas}"
        elif key in unschedulable:
            why = "it no longer fits anywhere (see unschedulable)"
        else:
            why = "no longer placed"
        out.append(Change(replica_address(model, replica), Action.DELETE, why, "restart",
                          main.node, (("node", main.node), ("port", str(main.facts.port)))))
    for node, inst in loose:
        out.append(Change(f"node.{node}.instance.{inst.id}", Action.DELETE,
                          "not an instance of this stack's replicas", "restart", node))
    return out


# --------------------------------------------------------------------------- router


def _router_change_unknown(observed: Observed, placements: Placements,
                           instances_changed: bool) -> Change | None:
    """The `router` change for facts that do not report what apply wrote (snapshots from
    before `managed`): created on a fleet with no agent yet, else updated whenever a
    replica changes (its routes do)."""
    reachable = [n for n in placements.routers
                 if n in observed.nodes and observed.nodes[n].reachable]
    hosts = ", ".join(placements.routers) or "no host"
    details = (("hosts", hosts),)
    if reachable and all(observed.nodes[n].agent.version is None for n in reachable):
        return Change("router", Action.CREATE, f"install on {hosts}", "none", None, details)
    if instances_changed:
        return Change("router", Action.UPDATE, "replicas changed", "none", None, details)
    return None


# --------------------------------------------------------------------------- the plan


def plan(spec: StackSpec, observed: Observed, placements: Placements,
         assignments: Mapping[str, Assignment], stack_bytes: bytes,
         agent_version: str) -> Plan:
    """Compare desired (placements, assignments) with observed (facts): the plan."""
    hosts = _host_changes(spec, observed, placements, agent_version)
    instances = _instance_changes(spec, observed, placements, assignments)
    config = build_router_config(spec, placements, dict(assignments))
    config_sha = router_config_sha256(config)
    router_fp = router_fingerprint(config)
    files = {name: tuple(desired_files(spec, name, facts,
                                       assignments.get(name, Assignment(node=name)),
                                       router_fp if name in placements.routers else None))
             for name, facts in sorted(observed.nodes.items()) if facts.reachable}
    node_files, router_files = _file_changes(observed, files)
    known = any(observed.nodes[n].managed is not None for n in files if n in placements.routers)
    legacy = None if known else _router_change_unknown(observed, placements, bool(instances))
    router = router_files if known else [legacy] if legacy else []
    changes = tuple(sorted(hosts + node_files, key=_order) + sorted(instances, key=_order)
                    + sorted(router, key=_order))
    unreachable = tuple(Unreachable(name, facts.error or f"`{name}` did not answer",
                                    facts.hint or "")
                        for name, facts in sorted(observed.nodes.items()) if not facts.reachable)
    warnings = tuple(f"model.{model}: metadata unknown ({why}); running replicas kept"
                     for model, why in placements.unknown)
    return Plan(stack_sha256=sha256_bytes(stack_bytes), facts_sha256=facts_sha256(observed),
                changes=changes, placements=placements, router_config_sha256=config_sha,
                summary=Summary.of(changes), unreachable=unreachable, files=files,
                assignments=dict(assignments), warnings=warnings)


# --------------------------------------------------------------------------- files


def _file_changes(observed: Observed, files: Mapping[str, tuple[HostFile, ...]]
                  ) -> tuple[list[Change], list[Change]]:
    """Desired file fingerprints against what the facts report: node-level changes, and
    the fleet-wide ones (`router...`, `model.M.files`) merged over their nodes. A node
    whose agent is not installed yet gets its files with the agent (`node.N.agent`);
    facts that do not report files (an older snapshot) are unknown, not changed."""
    node_level: list[Change] = []
    merged: dict[tuple[str, Action, str], list[str]] = {}  # (address, action, why) -> nodes
    for name, wanted in files.items():
        facts = observed.nodes[name]
        fresh = facts.managed is None or facts.agent.version is None
        for f in wanted:
            if fresh:
                if f.address == "router":
                    merged.setdefault(("router", Action.CREATE, "install"), []).append(name)
                continue
            assert facts.managed is not None
            drift = _file_drift(f, facts.managed.get(f.path))
            if f.address == "router" and not drift and facts.service_manager == "supervise" \
                    and not facts.services_alive.get("router", False):
                drift = [("router", Action.UPDATE, "not running")]
            for address, action, reason in drift:
                if address.startswith("node."):
                    node_level.append(Change(address, action, reason, "none", name,
                                             (("path", f.path),)))
                else:
                    merged.setdefault((address, action, reason), []).append(name)
    fleet = []
    for (address, action, reason), nodes in sorted(merged.items()):
        where = ", ".join(sorted(nodes))
        label = "hosts" if address.startswith("router") else "nodes"
        fleet.append(Change(address, action, f"{reason} on {where}", "none", None,
                            ((label, where),)))
    return node_level, fleet


def _file_drift(want: HostFile, have: ManagedFile | None) -> list[tuple[str, Action, str]]:
    """(address, action, reason) for each way the file on the host differs from `want`."""
    if have is None:
        return [(want.address, Action.CREATE, "upload" if want.kind == "upload" else "write")]
    if have.sha256 is None:
        return [(want.address, Action.CREATE, "missing")]
    if have.drifted:
        return [(want.address, Action.UPDATE, "changed by hand")]
    old = dict(p.split(":", 1) for p in have.fingerprint.split(",")) \
        if ":" in have.fingerprint else {"": have.fingerprint}
    return [(f"{want.address}.{part}" if part else want.address, Action.UPDATE, "changed")
            for part, value in want.parts().items() if old.get(part) != value]


def _order(change: Change) -> tuple[Any, ...]:
    # addresses sort by their parts, with replica numbers as numbers: [2] before [10]
    head, _, index = change.address.partition("[")
    number = int(index.rstrip("]")) if index.rstrip("]").isdigit() else -1
    return (head, number, change.address)
