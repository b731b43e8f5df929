"""nvidia-smi: `--query-gpu=... --format=csv` output, with or without header and units.

The parser reads columns by the header's field names, so it accepts any field list and
order (the facts script asks for `QUERY_FIELDS`; recorded outputs of other field lists parse
too). Output without a header needs `fields=`. Error outputs raise `GpuToolError`.
ixsmi (Iluvatar) copies this interface and uses the same parser with `vendor="iluvatar"`.
"""

from __future__ import annotations

import csv
import io
import re

from agent.gpus.types import (
    MIB,
    GpuInfo,
    GpuToolError,
    ToolStatus,
    Vendor,
    missing,
    number,
    text,
)

QUERY_FIELDS = (
    "index", "uuid", "name", "pci.bus_id", "memory.total", "memory.used", "utilization.gpu",
    "temperature.gpu", "power.draw", "driver_version", "compute_cap",
)
COMMAND = ("nvidia-smi", f"--query-gpu={','.join(QUERY_FIELDS)}", "--format=csv")

_ERRORS: tuple[tuple[str, ToolStatus, str], ...] = (
    ("couldn't communicate with the nvidia driver", ToolStatus.DRIVER_NOT_LOADED,
     "the NVIDIA kernel module is not loaded: install the driver (`drivers.nvidia` in "
     "stack.toml) or reboot after installing it, then check `nvidia-smi`."),
    ("driver/library version mismatch", ToolStatus.VERSION_MISMATCH,
     "the driver libraries were upgraded but the old kernel module is still loaded: reboot "
     "the host (`stack apply --allow-reboot`)."),
    ("unable to determine the device handle", ToolStatus.DEVICE_ERROR,
     "a GPU is in a bad state (fell off the bus or an Xid error): check `dmesg`, then reset "
     "the GPU or reboot the host."),
    ("failed to initialize nvml", ToolStatus.DRIVER_NOT_LOADED,
     "NVML cannot start: check that the NVIDIA driver is installed and loaded."),
)
_FIELD = re.compile(r"^[a-z][a-z0-9_.]*(?: \[[^\]]+\])?$", re.IGNORECASE)


def tool_error(output: str, tool: str = "nvidia-smi") -> GpuToolError | None:
    """The error an nvidia-smi style output reports, if it is one."""
    lowered = output.lower()
    for needle, status, hint in _ERRORS:
        if needle in lowered:
            line = next(ln for ln in output.splitlines() if needle in ln.lower())
            return GpuToolError(tool, status, line.strip(), hint)
    return None


def _is_header(cells: list[str]) -> bool:
    return bool(cells) and all(_FIELD.match(c) for c in cells) and any(
        c.split(" [")[0] in ("index", "name", "uuid", "timestamp", "driver_version",
                             "memory.total", "memory.used", "pci.bus_id") for c in cells
    )


def _mib(value: str | None) -> int:
    amount = number(value or "")
    return int(amount * MIB) if amount is not None else 0


def parse_nvidia_csv(output: str, *, fields: tuple[str, ...] | None = None,
                     vendor: Vendor = "nvidia", tool: str = "nvidia-smi") -> list[GpuInfo]:
    """GPUs from `nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]` output."""
    rows = [[c.strip() for c in row] for row in csv.reader(io.StringIO(output)) if row]
    names: list[str] | None = list(fields) if fields is not None else None
    if rows and _is_header(rows[0]):
        names = [c.split(" [")[0] for c in rows[0]]
        rows = rows[1:]
    if names is None:
        error = tool_error(output, tool)
        if error:
            raise error
        raise GpuToolError(tool, ToolStatus.UNPARSABLE, "output has no CSV header",
                           "run it with `--format=csv` (with the header).")
    gpus = []
    for position, row in enumerate(r for r in rows if len(r) == len(names)):
        value = dict(zip(names, row, strict=True))
        total = value.get("memory.total")
        if total is None and "memory.free" in value:  # total = reserved + used + free
            parts = [number(value.get(k, "0")) for k in ("memory.reserved", "memory.used",
                                                            "memory.free")]
            total = None if None in parts else str(sum(p or 0.0 for p in parts))
        index = number(value.get("index", ""))
        gpus.append(GpuInfo(
            index=int(index) if index is not None else position,
            vendor=vendor,
            uuid=text(value.get("uuid", "")) or "",
            name=text(value.get("name", value.get("gpu_name", ""))) or "",
            memory_bytes=_mib(total),
            memory_used_bytes=_mib(value.get("memory.used")),
            compute_capability=text(value.get("compute_cap", "")),
            driver=text(value.get("driver_version", "")),
            utilization_percent=number(value.get("utilization.gpu", "")),
            temperature_c=number(value.get("temperature.gpu", "")),
            power_w=number(value.get("power.draw", "")),
            pci_bus_id=text(value.get("pci.bus_id", "")),
            unified_memory=total is not None and missing(total),
        ))
    if not gpus:
        error = tool_error(output, tool)
        if error:
            raise error
    return gpus


IXSMI_COMMAND = ("ixsmi", f"--query-gpu={','.join(QUERY_FIELDS)}", "--format=csv")


def parse_ixsmi_csv(output: str) -> list[GpuInfo]:
    """Iluvatar GPUs from `ixsmi --query-gpu=... --format=csv` (nvidia-smi's interface).

    UNTESTED against a real ixsmi output: none is recorded (see the fixtures' SOURCES.md).
    """
    return parse_nvidia_csv(output, vendor="iluvatar", tool="ixsmi")
