"""GPU metrics for `/v1/status` and `/metrics`.

NVIDIA GPUs through nvidia-ml-py when the NVIDIA library loads (each field in its own try:
many GPUs lack some), and every other vendor's through its tool with the parsers the facts
use (`agent.gpus`); without NVML the NVIDIA GPUs come from nvidia-smi too. `source` says
where the numbers came from: `nvml`, `tools`, `nvml+tools` (a host with NVIDIA and other
accelerators), or `unavailable` with the reason (the tool's error and hint, e.g. the NVIDIA
driver not loaded). NVML that did not load is tried again after `NVML_RETRY_SECONDS` (a
driver installed or loaded while the agent runs). Read on request and cached for a few
seconds, never in the reconcile loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

log = logging.getLogger("agent.gpu_metrics")

CACHE_SECONDS = 2.0
NVML_RETRY_SECONDS = 60.0


def _field(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception:  # pynvml raises NVMLError_NotSupported and friends per field
        return None


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


_NVML_FIELDS = ("uuid", "name", "utilization_percent", "memory_bytes", "memory_used_bytes",
                "temperature_c", "power_w")


class GpuReading(NamedTuple):
    """GPU metrics as `/v1/status` shows them: `gpu_source`, `gpus`, `gpu_error`."""

    source: str  # nvml, tools or unavailable
    gpus: list[dict[str, Any]]
    error: str | None  # why there are none (or why a tool failed), with a hint


def _tool_gpu(gpu: Any) -> dict[str, Any]:
    """A parsed tool GPU as a metrics dict: memory a tool did not report is None, not 0."""
    item: dict[str, Any] = gpu.to_dict()
    if gpu.unified_memory or not gpu.memory_bytes:  # `[N/A]` (GB10, Jetson) or absent
        item["memory_bytes"] = item["memory_used_bytes"] = None
    return item


class GpuReader:
    """Reads per-GPU utilization, memory, temperature and power."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._nvml: Any = None
        self._nvml_tried_at: float | None = None
        self._nvml_error: str | None = None
        self._cache: tuple[float, GpuReading] | None = None

    def _load_nvml(self, now: float) -> Any:
        if self._nvml is None and (self._nvml_tried_at is None
                                   or now - self._nvml_tried_at >= NVML_RETRY_SECONDS):
            self._nvml_tried_at = now
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml, self._nvml_error = pynvml, None
            except Exception as exc:  # library missing or driver not loaded
                self._nvml_error = f"NVML did not load ({type(exc).__name__}: {exc})"
                log.info("NVML unavailable (%s); trying vendor tools", type(exc).__name__)
        return self._nvml

    @staticmethod
    def _read_nvml_device(nv: Any, i: int) -> dict[str, Any]:
        h = _field(lambda: nv.nvmlDeviceGetHandleByIndex(i))
        if h is None:  # a lost GPU must not hide the others
            return {"index": i, "vendor": "nvidia", **dict.fromkeys(_NVML_FIELDS)}
        mem = _field(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        power = _field(lambda: nv.nvmlDeviceGetPowerUsage(h))
        return {
            "index": i, "vendor": "nvidia",
            "uuid": _text(_field(lambda: nv.nvmlDeviceGetUUID(h))),
            "name": _text(_field(lambda: nv.nvmlDeviceGetName(h))),
            "utilization_percent": _field(lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu)),
            "memory_bytes": mem.total if mem is not None else None,
            "memory_used_bytes": mem.used if mem is not None else None,
            "temperature_c": _field(lambda: float(nv.nvmlDeviceGetTemperature(h, 0))),
            "power_w": power / 1000.0 if power is not None else None,
        }

    def _read_nvml(self, nv: Any) -> list[dict[str, Any]]:
        return [self._read_nvml_device(nv, i) for i in range(nv.nvmlDeviceGetCount())]

    @staticmethod
    def _read_tools(skip_vendors: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], str | None]:
        """(GPUs, the failed tools' errors with hints) from the vendor tools on PATH."""
        from agent.gpus import GpuToolError, read_gpus

        errors: list[GpuToolError] = []
        try:
            gpus = [_tool_gpu(gpu) for gpu in read_gpus(timeout=5.0, errors=errors,
                                                        skip_vendors=skip_vendors)]
        except Exception as exc:  # a broken tool must not break the status page
            log.warning("reading GPU metrics from vendor tools failed: %s", exc)
            return [], f"reading the GPU vendor tools failed: {exc}"
        return gpus, "; ".join(f"{e} hint: {e.hint}" for e in errors) or None

    def read(self) -> GpuReading:
        """The GPUs and where their numbers came from."""
        now = self._clock()
        if self._cache and now - self._cache[0] < CACHE_SECONDS:
            return self._cache[1]
        nv = self._load_nvml(now)
        reason = self._nvml_error
        nvidia: list[dict[str, Any]] | None = None
        if nv is not None:
            try:
                nvidia = self._read_nvml(nv)
            except Exception as exc:  # e.g. the driver went away after nvmlInit
                log.warning("reading GPU metrics through NVML failed: %s", exc)
                reason = f"NVML failed ({type(exc).__name__}: {exc})"
                self._nvml, self._nvml_tried_at = None, now  # init again after a while
        if nvidia is None:
            gpus, error = self._read_tools()
            source = "tools" if gpus else "unavailable"
            if not gpus and error is None:
                error = (f"{reason or 'NVML did not load'} and no GPU vendor tool "
                         "(`nvidia-smi`, `rocm-smi`, `npu-smi`, ...) is on PATH")
        else:  # NVML has the NVIDIA GPUs; the tools the other vendors' (a mixed host)
            others, error = self._read_tools(skip_vendors=("nvidia",))
            gpus, source = nvidia + others, "nvml+tools" if others else "nvml"
        reading = GpuReading(source, gpus, error)
        self._cache = (now, reading)
        return reading
