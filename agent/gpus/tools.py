"""The vendor tools a host is asked, in order, with their parsers: `TOOLS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.gpus import amd, apple, ascend, cambricon, mthreads, nvidia
from agent.gpus.amd import parse_amd_smi_static_json, parse_hy_smi_json, parse_rocm_smi_json
from agent.gpus.apple import parse_system_profiler
from agent.gpus.ascend import parse_npu_smi_info
from agent.gpus.cambricon import parse_cnmon_json
from agent.gpus.mthreads import parse_mthreads_gmi
from agent.gpus.nvidia import parse_ixsmi_csv, parse_nvidia_csv
from agent.gpus.types import GpuInfo


@dataclass(frozen=True)
class Tool:
    """A vendor tool: the command that lists GPUs and the parser of its output."""

    name: str
    vendor: str  # the vendor whose GPUs it lists
    group: str  # tools of one group answer the same question; the first present wins
    command: tuple[str, ...]
    parse: Callable[[str], list[GpuInfo]]


TOOLS: tuple[Tool, ...] = (
    Tool("nvidia-smi", "nvidia", "nvidia", nvidia.COMMAND, parse_nvidia_csv),
    Tool("hy-smi", "hygon", "rocm", amd.HY_SMI_COMMAND, parse_hy_smi_json),
    Tool("rocm-smi", "amd", "rocm", amd.ROCM_SMI_COMMAND, parse_rocm_smi_json),
    Tool("amd-smi", "amd", "rocm", amd.AMD_SMI_COMMAND, parse_amd_smi_static_json),
    Tool("npu-smi", "ascend", "ascend", ascend.COMMAND, parse_npu_smi_info),
    Tool("mthreads-gmi", "mthreads", "mthreads", mthreads.COMMAND, parse_mthreads_gmi),
    Tool("ixsmi", "iluvatar", "iluvatar", nvidia.IXSMI_COMMAND, parse_ixsmi_csv),
    Tool("cnmon", "cambricon", "cambricon", cambricon.COMMAND, parse_cnmon_json),
    Tool("system_profiler", "apple", "apple", apple.COMMAND, parse_system_profiler),
)
TOOLS_BY_NAME: dict[str, Tool] = {tool.name: tool for tool in TOOLS}

# PCI vendor ids of accelerators (class 0x03 display, 0x12 processing accelerator).
PCI_VENDORS: dict[str, str] = {
    "0x10de": "nvidia", "0x1002": "amd", "0x19e5": "ascend", "0x1d94": "hygon",
    "0x1e3e": "iluvatar", "0x1ed5": "mthreads", "0xcabc": "cambricon",
}
