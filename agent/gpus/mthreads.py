"""mthreads-gmi (Moore Threads): the default table printed without arguments.

Each GPU is a block whose first line is `ID Name |PCIe |%GPU Mem` with memory as
`USEDMiB(TOTALMiB)` and whose second line holds the temperature (`52C`).
"""

from __future__ import annotations

import re

from agent.gpus.types import MIB, GpuInfo, number

COMMAND = ("mthreads-gmi",)

_DRIVER = re.compile(r"Driver Version:\s*(\S+)")
_FIRST = re.compile(r"^(\d+)\s+(.+?)\s*\|\s*(\S+)\s*\|\s*(\S+)\s+(\d+)MiB\((\d+)MiB\)")
_TEMP = re.compile(r"\|\s*(\d+(?:\.\d+)?)C\b")


def parse_mthreads_gmi(output: str) -> list[GpuInfo]:
    """Moore Threads GPUs from `mthreads-gmi`."""
    driver = _DRIVER.search(output)
    gpus: list[GpuInfo] = []
    lines = output.splitlines()
    for k, line in enumerate(lines):
        match = _FIRST.match(line)
        if not match:
            continue
        temp = _TEMP.search(lines[k + 1]) if k + 1 < len(lines) else None
        gpus.append(GpuInfo(
            index=int(match.group(1)),
            vendor="mthreads",
            name=match.group(2),
            memory_bytes=int(match.group(6)) * MIB,
            memory_used_bytes=int(match.group(5)) * MIB,
            driver=driver.group(1) if driver else None,
            utilization_percent=number(match.group(4)),
            temperature_c=float(temp.group(1)) if temp else None,
            pci_bus_id=match.group(3),
        ))
    return gpus
