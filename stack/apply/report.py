"""What apply is asked to do (`ApplyOptions`) and what it did (`HostReport`, `ApplyResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class HostReport:
    """What apply did on one host."""

    node: str
    changed: list[str] = field(default_factory=list)
    error: str | None = None
    hint: str = ""

    def fail(self, error: str, hint: str = "") -> None:
        if self.error is None:
            self.error, self.hint = error, hint


@dataclass
class ApplyResult:
    """The outcome of one apply: a report per host and the router's."""

    hosts: dict[str, HostReport] = field(default_factory=dict)
    router_changed: bool = False
    lock_id: str = ""

    @property
    def ok(self) -> bool:
        return all(r.error is None for r in self.hosts.values())

    @property
    def changed(self) -> bool:
        return self.router_changed or any(r.changed for r in self.hosts.values())

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "changed": self.changed, "router_changed": self.router_changed,
                "hosts": {n: {"changed": r.changed, "error": r.error, "hint": r.hint}
                          for n, r in sorted(self.hosts.items())}}


@dataclass(frozen=True)
class ApplyOptions:
    allow_reboot: bool = False
    max_unavailable: int = 1
    ready_timeout: float = 900.0
    poll_interval: float = 0.5
    stop_timeout: float = 60.0  # removed instances: the agent's grace, then SIGKILL
    trust_new_hosts: bool = False  # learn SSH keys of hosts never seen (never in CI)
