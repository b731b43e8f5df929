"""cnmon (Cambricon): `cnmon info -e -m -u -j` writes `cnmon_info.json` in the current folder.

UNTESTED against a real output: no recorded capture exists (see the fixtures' SOURCES.md).
Written from the format other tools' code reads: `{"CnmonInfo": [{"CardNum", "ProductName",
"UUID", "PhysicalMemUsage": {"Total", "Used"} (MiB), "Utilization": {"MLUAverage"}}]}`.
"""

from __future__ import annotations

import json
from typing import Any

from agent.gpus.types import MIB, GpuInfo, GpuToolError, ToolStatus, number

COMMAND = ("cnmon", "info", "-e", "-m", "-u", "-j")


def _num(value: Any) -> float | None:
    return number(str(value)) if value is not None else None


def parse_cnmon_json(output: str) -> list[GpuInfo]:
    """Cambricon MLUs from the content of `cnmon_info.json`."""
    try:
        cards = json.loads(output).get("CnmonInfo", [])
    except (json.JSONDecodeError, AttributeError) as exc:
        raise GpuToolError("cnmon", ToolStatus.UNPARSABLE, "cnmon_info.json is not JSON",
                           "run `cnmon info -e -m -u -j` on the host by hand.") from exc
    gpus = []
    for position, card in enumerate(cards):
        memory = card.get("PhysicalMemUsage", {})
        gpus.append(GpuInfo(
            index=int(_num(card.get("CardNum")) or position),
            vendor="cambricon",
            uuid=str(card.get("UUID", "")),
            name=str(card.get("ProductName", "")),
            memory_bytes=int((_num(memory.get("Total")) or 0) * MIB),
            memory_used_bytes=int((_num(memory.get("Used")) or 0) * MIB),
            utilization_percent=_num(card.get("Utilization", {}).get("MLUAverage")),
        ))
    return gpus
