"""rocm-smi `--json` (AMD, and Hygon DTK's rocm-smi / hy-smi) and amd-smi `static --json`.

rocm-smi prints `{"card0": {...}, "system": {...}}`; key spellings vary between releases
(`Card Series` / `Card series`) and vendors (Hygon: `DCU use (%)`,
`vram Total Memory (MiB)`), so keys are matched case-insensitively from a list.
"""

from __future__ import annotations

import json
import re
from typing import Any

from agent.gpus.types import MIB, GpuInfo, GpuToolError, ToolStatus, Vendor, number, text

ROCM_SMI_FLAGS = ("--showid", "--showmeminfo", "vram", "--showpower", "--showuse", "--showtemp",
                  "--showproductname", "--showuniqueid", "--json")
ROCM_SMI_COMMAND = ("rocm-smi", *ROCM_SMI_FLAGS)
HY_SMI_COMMAND = ("hy-smi", *ROCM_SMI_FLAGS)
AMD_SMI_COMMAND = ("amd-smi", "static", "--json")

_NAME_KEYS = ("card series", "device name", "card model", "card sku")
_USE_KEYS = ("gpu use (%)", "dcu use (%)")
_TEMP_KEYS = ("temperature (sensor edge) (c)", "temperature (sensor junction) (c)")
_POWER_KEYS = ("average graphics package power (w)", "current socket graphics package power (w)")


def _first(card: dict[str, str], keys: tuple[str, ...]) -> str:
    for key in keys:
        if key in card and text(card[key]):
            return card[key]
    return ""


def _memory(card: dict[str, str], kind: str) -> int:
    """`VRAM Total Memory (B)` or Hygon's `vram Total Memory (MiB)` in bytes."""
    for key, value in card.items():
        match = re.fullmatch(rf"vram total {kind}memory \((b|mib)\)", key)
        if match and number(value) is not None:
            scale = 1 if match.group(1) == "b" else MIB
            return int(float(number(value) or 0) * scale)
    return 0


def _load(output: str, tool: str) -> Any:
    # DTK prints a banner line before the JSON
    start = min((i for i in (output.find("{"), output.find("[")) if i >= 0), default=-1)
    try:
        return json.loads(output[start:] if start >= 0 else output)
    except json.JSONDecodeError as exc:
        raise GpuToolError(tool, ToolStatus.UNPARSABLE, f"not JSON ({exc.msg})",
                           "check that the ROCm/DTK tools work: run the tool by hand.") from exc


def parse_rocm_smi_json(output: str, *, vendor: Vendor = "amd",
                        tool: str = "rocm-smi") -> list[GpuInfo]:
    """GPUs from `rocm-smi ... --json` (vendor `hygon` for DTK's rocm-smi and hy-smi)."""
    data = _load(output, tool)
    cards = sorted(((int(k[4:]), v) for k, v in data.items() if re.fullmatch(r"card\d+", k)),
                   key=lambda item: item[0])
    system = {k.lower(): v for k, v in data.get("system", {}).items()}
    gpus = []
    for index, raw in cards:
        card = {k.lower(): str(v) for k, v in raw.items()}
        gfx = text(card.get("gfx version", ""))
        gpus.append(GpuInfo(
            index=index,
            vendor=vendor,
            uuid=text(card.get("unique id", "")) or "",
            name=text(_first(card, _NAME_KEYS)) or "",
            memory_bytes=_memory(card, ""),
            memory_used_bytes=_memory(card, "used "),
            compute_capability=gfx,
            driver=text(str(system.get("driver version", ""))),
            utilization_percent=number(_first(card, _USE_KEYS)),
            temperature_c=number(_first(card, _TEMP_KEYS)),
            power_w=number(_first(card, _POWER_KEYS)),
            pci_bus_id=text(card.get("pci bus", "")),
        ))
    return gpus


def parse_hy_smi_json(output: str) -> list[GpuInfo]:
    """Hygon DCUs from `hy-smi ... --json` or DTK's `rocm-smi ... --json`."""
    return parse_rocm_smi_json(output, vendor="hygon", tool="hy-smi")


def _size(value: Any) -> int:
    """amd-smi sizes: `{"value": 196592, "unit": "MB"}` (MB means MiB there)."""
    if isinstance(value, dict) and number(str(value.get("value", ""))) is not None:
        unit = str(value.get("unit", "MB")).upper()
        scale = {"B": 1, "KB": 1024, "MB": MIB, "GB": 1024**3}.get(unit, MIB)
        return int(float(number(str(value["value"])) or 0) * scale)
    return 0


def parse_amd_smi_static_json(output: str) -> list[GpuInfo]:
    """GPUs from `amd-smi static --json` (a list before ROCm 7, `{"gpu_data": [...]}` after).

    Written from the documented format; only the `vram` fragment of a real output is in the
    fixtures, so the name/uuid fields are untested against a real capture.
    """
    data = _load(output, "amd-smi")
    items = data.get("gpu_data", []) if isinstance(data, dict) else data
    gpus = []
    for position, item in enumerate(items):
        asic = item.get("asic", {})
        vram = item.get("vram", {})
        gpus.append(GpuInfo(
            index=int(item.get("gpu", position)),
            vendor="amd",
            uuid=str(asic.get("asic_serial", "")),
            name=str(asic.get("market_name", "")),
            memory_bytes=_size(vram.get("size")),
            compute_capability=text(str(asic.get("target_graphics_version", ""))),
            driver=text(str(item.get("driver", {}).get("version", ""))),
        ))
    return gpus


def amd_smi_vram_bytes(fragment: str) -> int:
    """The VRAM size of one `amd-smi static --json` GPU's `vram` object."""
    return _size(json.loads(fragment).get("size"))
