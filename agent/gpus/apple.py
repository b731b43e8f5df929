"""system_profiler (macOS): `system_profiler SPDisplaysDataType` text output.

The text form is used because only it is recorded complete in the fixtures. A GPU is a
4-space-indented `Name:` block with `Chipset Model`, `Vendor`, `VRAM (Total)` and, on Apple
silicon, `Total Number of Cores` and no VRAM line: its memory is the host's RAM
(`unified_memory`; facts fill it from `sysctl hw.memsize`).
"""

from __future__ import annotations

import re

from agent.gpus.types import GpuInfo

COMMAND = ("system_profiler", "SPDisplaysDataType")

_UNITS = {"MB": 1024**2, "GB": 1024**3}


def _blocks(output: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    in_displays = False
    for line in output.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        stripped = line.strip()
        if indent == 4 and stripped.endswith(":"):
            blocks.append({})
            in_displays = False
        elif blocks and indent == 6:
            key, _, value = stripped.partition(":")
            in_displays = key == "Displays"
            if not in_displays:
                blocks[-1][key] = value.strip()
    return blocks


def parse_system_profiler(output: str) -> list[GpuInfo]:
    """GPUs from `system_profiler SPDisplaysDataType`."""
    gpus: list[GpuInfo] = []
    for block in _blocks(output):
        if "Chipset Model" not in block:
            continue
        vendor = block.get("Vendor", "")
        vram = re.match(r"(\d+(?:\.\d+)?)\s*(MB|GB)", block.get("VRAM (Total)", "")
                        or block.get("VRAM (Dynamic, Max)", ""))
        apple = vendor.startswith("Apple")
        gpus.append(GpuInfo(
            index=len(gpus),
            vendor="apple" if apple else ("amd" if "0x1002" in vendor else
                                          "nvidia" if "0x10de" in vendor else "apple"),
            name=block["Chipset Model"],
            memory_bytes=int(float(vram.group(1)) * _UNITS[vram.group(2)]) if vram else 0,
            compute_capability=block.get("Metal Support") or block.get("Metal"),
            unified_memory=apple and vram is None,
        ))
    return gpus
