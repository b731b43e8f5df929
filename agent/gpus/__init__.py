"""GPU vendor tools: pure parsers of their outputs, and `read_gpus()` to run them here.

No pyinfra and no controller code: the agent imports this for metrics when pynvml is not
available, and the controller's facts parse the outputs the facts script collected.

    parse_nvidia_csv / parse_ixsmi_csv    nvidia-smi, ixsmi --query-gpu --format=csv
    parse_rocm_smi_json / parse_hy_smi_json   rocm-smi / hy-smi --json (AMD, Hygon)
    parse_amd_smi_static_json             amd-smi static --json
    parse_npu_smi_info                    npu-smi info (Ascend)
    parse_hccn_conf                       /etc/hccn.conf (Ascend device NIC addresses)
    parse_mthreads_gmi                    mthreads-gmi (Moore Threads)
    parse_cnmon_json                      cnmon_info.json (Cambricon)
    parse_system_profiler                 system_profiler SPDisplaysDataType (macOS)

`TOOLS` lists them in the order a host is asked; the first tool of a vendor group that is
present wins (`hy-smi` before `rocm-smi`, whose DTK build also runs on Hygon hosts).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.gpus.amd import (
        parse_amd_smi_static_json,
        parse_hy_smi_json,
        parse_rocm_smi_json,
    )
    from agent.gpus.apple import parse_system_profiler
    from agent.gpus.ascend import parse_hccn_conf, parse_npu_smi_info
    from agent.gpus.cambricon import parse_cnmon_json
    from agent.gpus.local import read_gpus, run_tools
    from agent.gpus.mthreads import parse_mthreads_gmi
    from agent.gpus.nvidia import parse_ixsmi_csv, parse_nvidia_csv
    from agent.gpus.tools import PCI_VENDORS, TOOLS, TOOLS_BY_NAME, Tool
    from agent.gpus.types import GpuInfo, GpuToolError, ToolStatus

# loaded on first use: the controller's facts model needs only `agent.gpus.types`
_WHERE = {
    "PCI_VENDORS": "tools", "TOOLS": "tools", "TOOLS_BY_NAME": "tools", "Tool": "tools",
    "GpuInfo": "types", "GpuToolError": "types", "ToolStatus": "types",
    "parse_amd_smi_static_json": "amd", "parse_hy_smi_json": "amd",
    "parse_rocm_smi_json": "amd", "parse_system_profiler": "apple",
    "parse_npu_smi_info": "ascend", "parse_hccn_conf": "ascend", "parse_cnmon_json": "cambricon",
    "parse_mthreads_gmi": "mthreads", "parse_ixsmi_csv": "nvidia",
    "parse_nvidia_csv": "nvidia", "read_gpus": "local", "run_tools": "local",
}

__all__ = [
    "PCI_VENDORS", "TOOLS", "TOOLS_BY_NAME", "GpuInfo", "GpuToolError", "Tool", "ToolStatus",
    "parse_amd_smi_static_json", "parse_cnmon_json", "parse_hccn_conf", "parse_hy_smi_json",
    "parse_ixsmi_csv",
    "parse_mthreads_gmi", "parse_npu_smi_info", "parse_nvidia_csv", "parse_rocm_smi_json",
    "parse_system_profiler", "read_gpus", "run_tools",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
