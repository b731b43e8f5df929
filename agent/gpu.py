"""GPU metrics for `/v1/status` and `/metrics`.

Through nvidia-ml-py when the NVIDIA library loads (each field in its own try: many
GPUs lack some), else through the vendor tools with the parsers the facts use
(`agent.gpus`), else none, with `source = "unavailable"`. Read on request and cached for
a few seconds, never in the reconcile loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("agent.gpu")

CACHE_SECONDS = 2.0


def _field(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception:  # pynvml raises NVMLError_NotSupported and friends per field
        return None


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class GpuReader:
    """Reads per-GPU utilization, memory, temperature and power."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._nvml_tried = False
        self._cache: tuple[float, str, list[dict[str, Any]]] | None = None

    def _load_nvml(self) -> Any:
        if not self._nvml_tried:
            self._nvml_tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # library missing or driver not loaded
                log.info("NVML unavailable (%s); trying vendor tools", type(exc).__name__)
        return self._nvml

    @staticmethod
    def _read_nvml_device(nv: Any, i: int) -> dict[str, Any]:
        h = nv.nvmlDeviceGetHandleByIndex(i)
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
    def _read_tools() -> list[dict[str, Any]]:
        from agent.gpus import read_gpus

        return [gpu.to_dict() for gpu in read_gpus(timeout=5.0)]

    def read(self) -> tuple[str, list[dict[str, Any]]]:
        """(source, gpus): source is `nvml`, `tools` or `unavailable`."""
        now = time.monotonic()
        if self._cache and now - self._cache[0] < CACHE_SECONDS:
            return self._cache[1], self._cache[2]
        source, gpus = "unavailable", []
        nv = self._load_nvml()
        try:
            if nv is not None:
                source, gpus = "nvml", self._read_nvml(nv)
            else:
                tools = self._read_tools()
                if tools:
                    source, gpus = "tools", tools
        except Exception as exc:  # a broken driver must not break the status page
            log.warning("reading GPU metrics failed: %s", exc)
            source, gpus = "unavailable", []
        self._cache = (now, source, gpus)
        return source, gpus
