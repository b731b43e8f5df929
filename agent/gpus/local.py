"""Run the vendor tools present on this machine and parse what they print."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Collection
from pathlib import Path

from agent.gpus.types import GpuInfo, GpuToolError, ToolStatus


def run_tools(timeout: float = 20.0,
              skip_vendors: Collection[str] = ()) -> dict[str, tuple[int, str]]:
    """tool name -> (exit status, stdout + stderr) for each tool found on PATH (except the
    tools of `skip_vendors`)."""
    from agent.gpus import TOOLS

    results: dict[str, tuple[int, str]] = {}
    done_groups: set[str] = set()
    for tool in TOOLS:
        if tool.vendor in skip_vendors or tool.group in done_groups \
                or shutil.which(tool.command[0]) is None:
            continue
        done_groups.add(tool.group)
        with tempfile.TemporaryDirectory() as folder:  # cnmon -j writes into the cwd
            try:
                proc = subprocess.run(list(tool.command), cwd=folder, capture_output=True,
                                      text=True, timeout=timeout, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                results[tool.name] = (-1, str(exc))
                continue
            output = proc.stdout + proc.stderr
            cnmon_file = Path(folder) / "cnmon_info.json"
            if tool.name == "cnmon" and cnmon_file.exists():
                output = cnmon_file.read_text(errors="replace")
            results[tool.name] = (proc.returncode, output)
    return results


def read_gpus(timeout: float = 20.0, errors: list[GpuToolError] | None = None,
              skip_vendors: Collection[str] = ()) -> list[GpuInfo]:
    """Every GPU the vendor tools on this machine report (but those of `skip_vendors`).

    Tools that fail are skipped; their errors (driver not loaded, ...) go to `errors`.
    """
    from agent.gpus import TOOLS_BY_NAME

    gpus: list[GpuInfo] = []
    for name, (_status, output) in run_tools(timeout, skip_vendors).items():
        try:
            gpus.extend(TOOLS_BY_NAME[name].parse(output))
        except GpuToolError as exc:
            if errors is not None:
                errors.append(exc)
        except (ValueError, KeyError, AttributeError) as exc:
            if errors is not None:
                errors.append(GpuToolError(name, ToolStatus.UNPARSABLE,
                                           f"its output was not understood ({exc!r})",
                                           f"run `{name}` by hand and check its output."))
    return gpus


__all__ = ["read_gpus", "run_tools"]
