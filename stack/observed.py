"""The observed fleet: the facts snapshot format of DESIGN.md (`stack facts --out`).

This is a public contract: `format_version` 1. Unknown fields are kept, missing optional
fields have defaults.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Vendor = Literal[
    "nvidia", "amd", "apple", "ascend", "hygon", "mthreads", "iluvatar", "cambricon", "cpu"
]
GPU_VENDORS: tuple[str, ...] = (
    "nvidia", "amd", "apple", "ascend", "hygon", "mthreads", "iluvatar", "cambricon",
)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class GpuFacts(_Open):
    """One accelerator as its vendor tool reports it."""

    index: int
    uuid: str = ""
    vendor: Vendor
    name: str = ""
    memory_bytes: int = 0
    memory_used_bytes: int = 0
    compute_capability: str | None = None
    driver: str | None = None
    utilization_percent: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None


class InstanceFacts(_Open):
    """One model instance as the node's agent reports it (the previous placement)."""

    id: str
    model: str
    replica: int = 0
    gpus: list[int] = Field(default_factory=list)
    port: int
    backend: str
    backend_version: str | None = None
    state: str = "unknown"
    # a fingerprint of everything that would restart the instance (args, env, source)
    spec_hash: str | None = None


class AgentFacts(_Open):
    """The agent on a node, if installed."""

    version: str | None = None
    running: bool = False
    instances: list[InstanceFacts] = Field(default_factory=list)


class NodeFacts(_Open):
    """One host of the fleet."""

    address: str = ""
    os: str = "linux"
    distro: str = ""
    kernel: str = ""
    arch: str = "x86_64"
    cpu_cores: int = 1
    memory_bytes: int = 0
    disk_free_bytes: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[GpuFacts] = Field(default_factory=list)
    runtimes: dict[str, list[str]] = Field(default_factory=dict)
    agent: AgentFacts = Field(default_factory=AgentFacts)
    reachable: bool = True
    error: str | None = None  # why the node could not be read (unreachable, refused key)
    reboot_required: bool = False
    secure_boot: bool | None = None


class Observed(_Open):
    """The whole fleet at one moment."""

    format_version: Literal[1] = 1
    collected_at: str = ""
    nodes: dict[str, NodeFacts] = Field(default_factory=dict)
