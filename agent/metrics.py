"""Prometheus text exposition of the agent's status and GPU metrics (`GET /metrics`)."""

from __future__ import annotations

from typing import Any

STATES = ("pending", "downloading", "starting", "ready", "unhealthy", "crash-looping",
          "failed", "stopping")

GPU_GAUGES = (
    ("utilization_percent", "modelstack_gpu_utilization_percent", "GPU utilization, percent."),
    ("memory_bytes", "modelstack_gpu_memory_total_bytes", "GPU memory, bytes."),
    ("memory_used_bytes", "modelstack_gpu_memory_used_bytes", "GPU memory in use, bytes."),
    ("temperature_c", "modelstack_gpu_temperature_celsius", "GPU temperature, Celsius."),
    ("power_w", "modelstack_gpu_power_watts", "GPU power draw, watts."),
)


def _label(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f'"{text}"'


def _labels(**labels: object) -> str:
    return "{" + ",".join(f"{k}={_label(v)}" for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    """A sample value written exactly: `85520809984`, `144.97` (`:g` keeps 6 digits only)."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _header(out: list[str], name: str, help_text: str, kind: str = "gauge") -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def render_metrics(status: dict[str, Any], gpu_source: str, gpus: list[dict[str, Any]]) -> str:
    """The metrics page for one agent."""
    node = status["node"]
    out: list[str] = []
    _header(out, "modelstack_agent_up", "1 while the agent runs.")
    out.append(f"modelstack_agent_up{_labels(node=node)} 1")
    _header(out, "modelstack_gpu_metrics_available", "1 when GPU metrics could be read.")
    out.append(f"modelstack_gpu_metrics_available{_labels(node=node, source=gpu_source)} "
               f"{0 if gpu_source == 'unavailable' else 1}")
    for key, name, help_text in GPU_GAUGES:
        _header(out, name, help_text)
        for gpu in gpus:
            value = gpu.get(key)
            if isinstance(value, int | float):
                labels = _labels(node=node, gpu=gpu.get("index", ""), uuid=gpu.get("uuid") or "",
                                 vendor=gpu.get("vendor") or "", name=gpu.get("name") or "")
                out.append(f"{name}{labels} {_number(value)}")
    instances = status["instances"]
    _header(out, "modelstack_instance_state", "1 for the instance's current state.")
    for inst in instances:
        for state in STATES:
            labels = _labels(node=node, instance=inst["id"], model=inst.get("model", ""),
                             state=state)
            out.append(f"modelstack_instance_state{labels} {int(inst['state'] == state)}")
    _header(out, "modelstack_instance_restarts_total", "Restarts after crashes.", "counter")
    for inst in instances:
        labels = _labels(node=node, instance=inst["id"], model=inst.get("model", ""))
        out.append(f"modelstack_instance_restarts_total{labels} {inst.get('restarts', 0)}")
    _header(out, "modelstack_instance_download_progress", "Model download progress, 0 to 1.")
    _header(out, "modelstack_instance_download_bytes", "Model bytes downloaded so far.")
    for inst in instances:
        progress = inst.get("progress") or {}
        labels = _labels(node=node, instance=inst["id"], model=inst.get("model", ""))
        if progress.get("fraction") is not None:
            out.append(f"modelstack_instance_download_progress{labels} "
                       f"{_number(progress['fraction'])}")
        if progress.get("bytes_done") is not None:
            out.append(f"modelstack_instance_download_bytes{labels} {progress['bytes_done']}")
    return "\n".join(out) + "\n"
