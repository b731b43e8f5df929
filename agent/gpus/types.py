"""What every vendor parser returns: `GpuInfo`, or `GpuToolError` with a status and a hint."""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

MIB = 1024**2

# Values vendor tools print for a field they cannot read.
_MISSING = re.compile(r"^\[?(n/a|not supported|unknown error|insufficient permissions|"
                      r"requested functionality has been deprecated|-+)\]?$", re.IGNORECASE)


Vendor = Literal[
    "nvidia", "amd", "apple", "ascend", "hygon", "mthreads", "iluvatar", "cambricon", "cpu"
]


class GpuInfo(BaseModel):
    """One accelerator as its vendor tool (or NVML) reports it: the one GPU record of the
    agent's metrics and of the controller's facts (`stack.snapshot.GpuFacts` is this type).

    `unified_memory` marks devices that share the host's RAM (Apple silicon, GB10, Jetson):
    the tool reports no memory of their own, and `memory_bytes` stays 0 here.

    `device_ip` (Ascend) is the address of the NPU's own NIC from /etc/hccn.conf, which a
    MindIE rank table needs to run a replica over several nodes; it is left out of the
    record when unknown, so records of other GPUs are as before.
    """

    model_config = ConfigDict(extra="allow")

    index: int
    vendor: Vendor
    uuid: str = ""
    name: str = ""
    memory_bytes: int = 0
    memory_used_bytes: int = 0
    compute_capability: str | None = None
    driver: str | None = None
    utilization_percent: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    pci_bus_id: str | None = None
    unified_memory: bool = False
    device_ip: str | None = None

    @field_validator("device_ip")
    @classmethod
    def _an_ip_address(cls, value: str | None) -> str | None:
        # it reaches a rank table file on the hosts: an IP address and nothing else
        return None if value is None else str(ipaddress.ip_address(value))

    @model_serializer(mode="wrap")
    def _without_unknown_device_ip(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("device_ip", "") is None:
            del data["device_ip"]
        return data

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


class ToolStatus(StrEnum):
    """Why a vendor tool gave no GPUs."""

    DRIVER_NOT_LOADED = "driver-not-loaded"
    VERSION_MISMATCH = "version-mismatch"
    DEVICE_ERROR = "device-error"
    UNPARSABLE = "unparsable"


class GpuToolError(Exception):
    """A vendor tool ran but reported a problem instead of GPUs."""

    def __init__(self, tool: str, status: ToolStatus, message: str, hint: str) -> None:
        super().__init__(f"`{tool}` failed: {message}")
        self.tool = tool
        self.status = status
        self.message = message
        self.hint = hint


def missing(value: str) -> bool:
    """True for `[N/A]`, `[Not Supported]`, `N/A`, `-` and other "no value" markers."""
    return not value.strip() or bool(_MISSING.match(value.strip()))


def number(value: str) -> float | None:
    """The leading number of `"69.91 W"`, `"0 %"`, `"45.0"`; None for missing values."""
    if missing(value):
        return None
    match = re.match(r"^\s*(-?[0-9]+(?:\.[0-9]+)?)", value)
    return float(match.group(1)) if match else None


def text(value: str) -> str | None:
    return None if missing(value) else value.strip()
