"""npu-smi (Huawei Ascend): the `npu-smi info` table.

Each chip is two table rows: `| NPU Name | Health | Power(W) Temp(C) Hugepages |` and
`| Chip [Device|Phy-ID] | Bus-Id | AICore(%) Memory-Usage(MB) [HBM-Usage(MB)] |`. Memory is
the HBM column when it has a capacity (910 series), else Memory-Usage (310 series).
The index is the chip's position, the logical id `ASCEND_RT_VISIBLE_DEVICES` takes.
"""

from __future__ import annotations

import ipaddress
import re

from agent.gpus.types import MIB, GpuInfo, GpuToolError, ToolStatus, number

COMMAND = ("npu-smi", "info")

_VERSION = re.compile(r"npu-smi\s+\S+\s+Version:\s*(\S+)")
_FIRST = re.compile(r"^\|\s*(\d+)\s+(.*?)\s*\|\s*(OK|Warning|Alarm|Critical|\S+)\s*\|(.*)\|\s*$")
_SECOND = re.compile(
    r"^\|\s*(\d+)(?:\s+\S+)?\s*\|\s*([0-9A-Fa-f]{4,8}:[0-9A-Fa-f:.]+)\s*\|(.*)\|\s*$"
)
_USAGE = re.compile(r"(\d+)\s*/\s*(\d+)")
# `address_3=192.168.100.104` in /etc/hccn.conf: the NIC address of device 3
_HCCN_ADDRESS = re.compile(r"address_(\d{1,5})=(\S+)")


def parse_npu_smi_info(output: str) -> list[GpuInfo]:
    """Ascend NPU chips from `npu-smi info`."""
    version = _VERSION.search(output)
    gpus: list[GpuInfo] = []
    pending: tuple[str, str, list[str]] | None = None
    for line in output.splitlines():
        if "Process id" in line or "Process ID" in line:
            break  # the process table follows the chips
        first = _FIRST.match(line)
        if first and not _SECOND.match(line):
            pending = (first.group(1), first.group(2), first.group(4).split())
            continue
        second = _SECOND.match(line)
        if second and pending is not None:
            _npu, name, power_temp = pending
            usages = [(int(u), int(t)) for u, t in _USAGE.findall(second.group(3))]
            used, total = next(((u, t) for u, t in reversed(usages) if t > 0), (0, 0))
            gpus.append(GpuInfo(
                index=len(gpus),
                vendor="ascend",
                name=f"Ascend {name}" if not name.lower().startswith("ascend") else name,
                memory_bytes=total * MIB,
                memory_used_bytes=used * MIB,
                driver=version.group(1) if version else None,
                utilization_percent=number(second.group(3).split()[0]),
                power_w=number(power_temp[0]) if power_temp else None,
                temperature_c=number(power_temp[1]) if len(power_temp) > 1 else None,
                pci_bus_id=second.group(2),
            ))
            pending = None
    if not gpus and "npu-smi" not in output:
        raise GpuToolError("npu-smi", ToolStatus.UNPARSABLE, output.strip()[:200] or "no output",
                           "check the Ascend driver: run `npu-smi info` on the host.")
    return gpus


def parse_hccn_conf(text: str) -> dict[int, str]:
    """Each device's NIC address from /etc/hccn.conf (`address_N=IP` lines; the facts
    script sends only those, joined by spaces): the `device_ip` of a MindIE rank table.

    Strict: a token that is not `address_N=` followed by an IPv4 or IPv6 address is
    ignored, and so is every later repeat of a device number.
    """
    found: dict[int, str] = {}
    for token in text.split():
        match = _HCCN_ADDRESS.fullmatch(token)
        if match is None:
            continue
        try:
            address = ipaddress.ip_address(match.group(2))
        except ValueError:
            continue
        found.setdefault(int(match.group(1)), str(address))
    return found
