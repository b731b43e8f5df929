"""The plan: what `stack apply` would change, as a frozen value, and its JSON form.

A `Plan` lists changes (an address, an action, a reason) with what apply needs to carry
them out: the placements, the assignments (without keys) and the files of every host.
`stack.changes` derives it; `render` shows it and `apply` carries it out. Its JSON form
(`Plan.to_json`) is a public contract (docs/plan.md, "JSON"), and `facts_sha256` is how
apply tells whether the fleet changed since a saved plan was made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.assignment import Assignment
from stack.errors import ConfigError
from stack.hostfiles import HostFile
from stack.placement import Placement, Placements, Unschedulable
from stack.snapshot import Observed

FORMAT_VERSION = 1
# facts that change from one reading to the next without anything to converge
VOLATILE_OBSERVED = ("collected_at",)
# other programs open and close ports and write files all the time (apply checks the
# disk again itself before it uploads anything)
VOLATILE_NODE = ("ports_in_use", "disk_free_bytes")
VOLATILE_GPU = ("utilization_percent", "temperature_c", "power_w", "memory_used_bytes")
VOLATILE_INSTANCE = ("state", "restarts", "last_error", "pid", "progress", "adopted",
                     "started_at", "last_exit_code", "last_log_lines", "engine")


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
class HostProblem:
    """A host apply leaves as it is, and why: its facts could not be read (`unreachable`:
    what runs there is unknown, its replicas are placed again on the hosts that answered),
    or another stack there collides with this one (`conflicts`, stack.neighbours)."""

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
    unreachable: tuple[HostProblem, ...] = ()
    conflicts: tuple[HostProblem, ...] = ()
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
        from stack.gcpause import gc_paused

        with gc_paused():  # 10,000 nodes: millions of new objects (docs/benchmarks/plan.md)
            return self._json()

    def _json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
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
        if self.conflicts:  # absent otherwise: plans from before it read the same
            data["conflicts"] = [c.to_json() for c in self.conflicts]
        return data

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
                        unreachable=_host_problems(data.get("unreachable", [])),
                        conflicts=_host_problems(data.get("conflicts", [])),
                        files=files, warnings=tuple(str(w) for w in data.get("warnings", [])),
                        assignments={str(node): Assignment.model_validate(a)
                                     for node, a in data.get("assignments", {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"`{where}` is not a plan written by `stack plan --out`: "
                              f"missing or bad {exc}",
                              hint="make it again with `stack plan --out PLAN`.") from exc


def _host_problems(items: list[dict[str, Any]]) -> tuple[HostProblem, ...]:
    return tuple(HostProblem(str(u["node"]), str(u["error"]), str(u.get("hint", "")))
                 for u in items)


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
        if node.get("stacks") is None:  # not read (an older snapshot): hashes as before it
            node.pop("stacks", None)
        for key in ("python", "libc"):  # not read (an older snapshot): hashes as before
            if not node.get(key):
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
