"""The observed fleet: the facts snapshot format (`stack facts --out`, docs/facts.md).

This is a public contract: `format_version` 1. Unknown fields are kept, missing optional
fields have defaults.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.gpus.types import GpuInfo
from agent.status import InstanceStatus

GPU_VENDORS: tuple[str, ...] = (
    "nvidia", "amd", "apple", "ascend", "hygon", "mthreads", "iluvatar", "cambricon",
)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


GpuFacts = GpuInfo  # one accelerator: the agent's record, also in the facts


InstanceFacts = InstanceStatus  # one instance as its agent reports it (the previous placement)


class AgentFacts(_Open):
    """The agent on a node, if installed."""

    version: str | None = None
    running: bool = False
    instances: list[InstanceFacts] = Field(default_factory=list)


class ManagedFile(_Open):
    """A file `stack apply` wrote on a node, as the node's facts read it: what apply
    recorded (`fingerprint` of the desired content without secrets, `written`: the sha256 of
    the bytes it wrote) and what is there now (`sha256`; None: the file is gone)."""

    kind: Literal["file", "upload"] = "file"
    fingerprint: str
    written: str = ""
    sha256: str | None = None  # uploads are not hashed on every read: `written` if present

    @property
    def drifted(self) -> bool:
        """Whether the file is gone or changed on the host since apply wrote it."""
        return self.sha256 is None or (self.kind == "file" and self.sha256 != self.written)


class StackOnHost(_Open):
    """A stack `stack apply` installed on a host (its record under
    `~/.config/modelstack/stacks/NAME`): where it lives, its agent's port and, on a
    router host, its router's port."""

    name: str
    prefix: str
    agent_port: int
    router_port: int | None = None


class NodeFacts(_Open):
    """One host of the fleet."""

    @model_validator(mode="before")
    @classmethod
    def _hint_apart(cls, data: Any) -> Any:
        """Snapshots from before `hint` carry it inside `error` after `\nhint: `."""
        if isinstance(data, dict) and isinstance(data.get("error"), str) \
                and "\nhint: " in data["error"] and not data.get("hint"):
            message, _, hint = data["error"].partition("\nhint: ")
            data = {**data, "error": message, "hint": hint}
        return data

    address: str = ""
    os: str = "linux"
    distro: str = ""
    kernel: str = ""
    arch: str = "x86_64"
    # `python3` on the SSH user's PATH, which runs the agent: `3.12` ("" unknown or none)
    python: str = ""
    # the C library: `glibc 2.36`, `musl` ("" macOS, or unknown); picks the agent's wheels
    libc: str = ""
    cpu_cores: int = 1
    memory_bytes: int = 0
    disk_free_bytes: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[GpuFacts] = Field(default_factory=list)
    runtimes: dict[str, list[str]] = Field(default_factory=dict)
    # the recipe digest each runtime folder was installed by, per name and folder (a folder
    # missing: installed by an older stack; None: these facts do not say)
    runtime_recipes: dict[str, dict[str, str]] | None = None
    agent: AgentFacts = Field(default_factory=AgentFacts)
    reachable: bool = True
    error: str | None = None  # why the node could not be read (unreachable, refused key)
    hint: str | None = None  # what to do about `error`
    reboot_required: bool = False
    secure_boot: bool | None = None
    # the files apply wrote, by path (None: these facts do not say, e.g. an older snapshot)
    managed: dict[str, ManagedFile] | None = None
    service_manager: Literal["supervise", "systemd", "launchd"] | None = None
    services_alive: dict[str, bool] = Field(default_factory=dict)  # supervised only
    ports_in_use: list[int] = Field(default_factory=list)  # TCP ports listening (any owner)
    # the stacks this SSH user installed here, ours too (None: an older snapshot)
    stacks: list[StackOnHost] | None = None
    # build prerequisites present (True) or missing (False), by command name or path
    # (deploys.prerequisites.CHECKED); None: these facts do not say (an older snapshot)
    build_tools: dict[str, bool] | None = None
    # beyond the snapshot's documented fields: what provisioning needs
    user: str = ""  # the SSH user
    sudo_ok: bool = True
    pci_accelerators: dict[str, int] = Field(default_factory=dict)  # vendor -> devices
    gpu_problems: list[dict[str, str]] = Field(default_factory=list)  # tool, status, message


class Observed(_Open):
    """The whole fleet at one moment."""

    format_version: Literal[1] = 1
    collected_at: str = ""
    nodes: dict[str, NodeFacts] = Field(default_factory=dict)
