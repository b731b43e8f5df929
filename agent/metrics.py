"""Prometheus text exposition of the agent's status, GPU and engine metrics (`GET /metrics`)."""

from __future__ import annotations

from typing import Any

from agent.engine_metrics import EngineSample

STATES = ("pending", "downloading", "starting", "ready", "unhealthy", "crash-looping",
          "failed", "stopping")

GPU_GAUGES = (
    ("utilization_percent", "modelstack_gpu_utilization_percent", "GPU utilization, percent."),
    ("memory_bytes", "modelstack_gpu_memory_total_bytes", "GPU memory, bytes."),
    ("memory_used_bytes", "modelstack_gpu_memory_used_bytes", "GPU memory in use, bytes."),
    ("temperature_c", "modelstack_gpu_temperature_celsius", "GPU temperature, Celsius."),
    ("power_w", "modelstack_gpu_power_watts", "GPU power draw, watts."),
)


# EngineSample field -> exported name, type, help (docs/operating.md, "Engine metrics")
ENGINE_SERIES = (
    ("requests_running", "modelstack_engine_requests_running", "gauge",
     "Requests the engine is running now."),
    ("requests_waiting", "modelstack_engine_requests_waiting", "gauge",
     "Requests waiting in the engine's queue."),
    ("kv_cache_usage_ratio", "modelstack_engine_kv_cache_usage_ratio", "gauge",
     "Fraction of the engine's KV cache in use, 0 to 1."),
    ("prompt_tokens_total", "modelstack_engine_prompt_tokens_total", "counter",
     "Prompt tokens the engine processed."),
    ("generation_tokens_total", "modelstack_engine_generation_tokens_total", "counter",
     "Tokens the engine generated."),
)
TTFT_NAME = "modelstack_engine_time_to_first_token_seconds"


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


def _render_engines(out: list[str], node: str, instances: list[dict[str, Any]],
                    engines: dict[str, EngineSample]) -> None:
    """The engine series of each scraped instance; a value its backend lacks is left out."""
    scraped = [(inst, engines[inst["id"]]) for inst in instances if inst["id"] in engines]

    def labels(inst: dict[str, Any], **more: object) -> str:
        return _labels(node=node, model=inst.get("model", ""), instance=inst["id"],
                       backend=inst.get("backend", ""), **more)

    _header(out, "modelstack_engine_up", "1 when the engine's own metrics could be read.")
    for inst, sample in scraped:
        out.append(f"modelstack_engine_up{labels(inst)} {int(sample.up)}")
    for key, name, kind, help_text in ENGINE_SERIES:
        _header(out, name, help_text, kind)
        for inst, sample in scraped:
            value = getattr(sample, key)
            if value is not None:
                out.append(f"{name}{labels(inst)} {_number(value)}")
    _header(out, TTFT_NAME, "Time to the first token of a request, seconds.", "histogram")
    for inst, sample in scraped:
        ttft = sample.time_to_first_token
        if ttft is None:
            continue
        for le, count in ttft.buckets:
            bound = "+Inf" if le == float("inf") else _number(le)
            out.append(f"{TTFT_NAME}_bucket{labels(inst, le=bound)} {_number(count)}")
        out.append(f"{TTFT_NAME}_sum{labels(inst)} {_number(ttft.sum)}")
        out.append(f"{TTFT_NAME}_count{labels(inst)} {_number(ttft.count)}")


def render_metrics(status: dict[str, Any], gpu_source: str, gpus: list[dict[str, Any]],
                   engines: dict[str, EngineSample] | None = None) -> str:
    """The metrics page for one agent; `engines` are the scraped instances' samples."""
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
    _render_engines(out, node, instances, engines or {})
    return "\n".join(out) + "\n"
