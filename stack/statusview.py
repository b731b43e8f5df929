"""What `stack status` shows, computed from reads of the fleet (pure: no clock, no I/O).

    parse_router_metrics(text) -> RouterSample   the numbers status uses from a router's page
    Reading                                      one read: node facts and router samples
    status_view(before, after, elapsed) -> dict  the rows (`stack status --json`)
    median_from_buckets(before, after)           a histogram's p50 between two reads

Rates (tokens/s, requests/s, the 5xx share) and the TTFT median are deltas between two
reads; without an earlier read, or when a counter went backwards (a restarted backend or
router), they are unknown (None), never 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from stack.snapshot import InstanceFacts, NodeFacts

METRIC_PREFIX = "modelstack_router_"
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Replica = tuple[str, str]  # (model, replica id = instance id)


@dataclass(frozen=True)
class RouterSample:
    """One router's counters at one time."""

    counters: dict[str, float] = field(default_factory=dict)
    """`requests`, `errors` (5xx), `tokens`, and `user:NAME:requests|tokens`."""
    in_flight: dict[Replica, float] = field(default_factory=dict)
    ttft_buckets: dict[Replica, dict[float, float]] = field(default_factory=dict)
    """Per replica: upper bound -> cumulative count of the time-to-first-token histogram."""


@dataclass(frozen=True)
class Reading:
    """The fleet as read once: each node's facts and each router host's sample (None: the
    router did not answer)."""

    nodes: dict[str, NodeFacts]
    routers: dict[str, RouterSample | None]
    listen: str
    engines: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Node -> instance id -> the `engine` object its agent's `/v1/status` reports (for
    backends whose metrics the agent reads)."""


def _labels(text: str) -> dict[str, str]:
    return {k: re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], v)
            for k, v in _LABEL.findall(text)}


def parse_router_metrics(text: str) -> RouterSample:
    """Request, 5xx and token totals (and per user, for keys that have one), in-flight
    requests and time-to-first-token buckets per replica, from a router's /metrics page."""
    sample = RouterSample(counters={"requests": 0.0, "errors": 0.0, "tokens": 0.0})
    counters = sample.counters
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        metric, _, labels_text = name.partition("{")
        metric = metric.removeprefix(METRIC_PREFIX)
        try:
            number = float(value)
        except ValueError:
            continue
        labels = _labels(labels_text)
        if metric in ("requests_total", "tokens_total"):
            kind = metric.removesuffix("_total")
            counters[kind] += number
            if kind == "requests" and labels.get("status") == "5xx":
                counters["errors"] += number
            if "user" in labels:
                label = f"user:{labels['user']}:{kind}"
                counters[label] = counters.get(label, 0.0) + number
        elif metric == "replica_in_flight":
            sample.in_flight[(labels["model"], labels["replica"])] = number
        elif metric == "replica_time_to_first_token_seconds_bucket":
            buckets = sample.ttft_buckets.setdefault((labels["model"], labels["replica"]), {})
            buckets[float(labels["le"])] = number
    return sample


def rates(first: dict[str, float], second: dict[str, float], seconds: float) -> dict[str, Any]:
    """Requests/s, tokens/s and the share of 5xx answers between two samples' counters, in
    all and per user."""
    span = max(seconds, 1e-6)

    def rate(name: str) -> float:
        return round((second.get(name, 0.0) - first.get(name, 0.0)) / span, 2)

    requests = second.get("requests", 0.0) - first.get("requests", 0.0)
    errors = second.get("errors", 0.0) - first.get("errors", 0.0)
    users = sorted({k.split(":", 1)[1].rsplit(":", 1)[0] for k in second
                    if k.startswith("user:")})
    return {"requests_per_second": rate("requests"), "tokens_per_second": rate("tokens"),
            "error_rate": round(errors / requests, 4) if requests > 0 else None,
            "users": {u: {"requests_per_second": rate(f"user:{u}:requests"),
                          "tokens_per_second": rate(f"user:{u}:tokens")} for u in users}}


def median_from_buckets(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The p50 of the observations between two reads of a cumulative histogram, linear
    within its bucket (as Prometheus' histogram_quantile); None without observations."""
    bounds = sorted(after)
    deltas = [after[b] - before.get(b, 0.0) for b in bounds]
    if not deltas or deltas[-1] <= 0 or any(d < 0 for d in deltas):
        return None
    rank = deltas[-1] / 2
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, deltas, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bound: the best known is that bound
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return None


def _engine(reading: Reading | None, node: str, inst: InstanceFacts) -> dict[str, Any]:
    """The engine counters the agent reports for an instance (empty when it has none)."""
    if reading is None:
        return {}
    engine = reading.engines.get(node, {}).get(inst.id)
    return engine if isinstance(engine, dict) and engine.get("up", True) else {}


def _tokens(engine: dict[str, Any]) -> float | None:
    prompt, generated = engine.get("prompt_tokens_total"), engine.get("generation_tokens_total")
    if not isinstance(prompt, int | float) or not isinstance(generated, int | float):
        return None
    return float(prompt) + float(generated)


def _tokens_per_second(before: InstanceFacts | None, first: dict[str, Any],
                       after: InstanceFacts, second: dict[str, Any],
                       elapsed: float) -> float | None:
    """Prompt plus generated tokens per second between two reads of the engine counters."""
    if before is None or before.restarts != after.restarts or elapsed <= 0:
        return None
    start, end = _tokens(first), _tokens(second)
    if start is None or end is None or end < start:
        return None
    return round((end - start) / elapsed, 2)


def _instances(before: Reading | None, after: Reading, elapsed: float,
               node: str, facts: NodeFacts) -> list[dict[str, Any]]:
    earlier = {i.id: i for i in (before.nodes[node].agent.instances
                                 if before is not None and node in before.nodes else [])}
    rows = []
    for inst in facts.agent.instances:
        replica = (inst.model, inst.id)
        engine = _engine(after, node, inst)
        running = engine.get("requests_running")
        flights = [s.in_flight[replica] for s in after.routers.values()
                   if s is not None and replica in s.in_flight]
        in_flight = (running if isinstance(running, int | float)
                     else sum(flights) if flights else None)
        rows.append({
            "id": inst.id, "model": inst.model, "replica": inst.replica, "state": inst.state,
            "restarts": inst.restarts, "endpoint": f"http://{inst.host or facts.address}"
                                                  f":{inst.port}",
            "backend": inst.backend, "backend_version": inst.backend_version,
            "requests_in_flight": in_flight,
            "tokens_per_second": _tokens_per_second(
                earlier.get(inst.id), _engine(before, node, inst), inst, engine, elapsed),
            "ttft_p50_seconds": _ttft_p50(before, after, replica),
        })
    return rows


def _ttft_p50(before: Reading | None, after: Reading, replica: Replica) -> float | None:
    """Over every router that has the replica: the summed bucket deltas' median."""
    if before is None:
        return None
    first: dict[float, float] = {}
    second: dict[float, float] = {}
    for name, sample in after.routers.items():
        earlier = before.routers.get(name)
        if sample is None or earlier is None or replica not in sample.ttft_buckets:
            continue
        for bound, count in sample.ttft_buckets[replica].items():
            second[bound] = second.get(bound, 0.0) + count
            first[bound] = first.get(bound, 0.0) + earlier.ttft_buckets.get(
                replica, {}).get(bound, 0.0)
    median = median_from_buckets(first, second)
    return None if median is None else round(median, 4)


def status_view(before: Reading | None, after: Reading, elapsed: float) -> dict[str, Any]:
    """The status document: per node its agent and GPUs, per instance its state and live
    numbers, per router its rates; `elapsed` is the seconds between the two reads (a router
    whose counters went backwards restarted in between: its rates are unknown)."""
    nodes: dict[str, Any] = {}
    for name, node in sorted(after.nodes.items()):
        nodes[name] = {
            "reachable": node.reachable and not node.error,
            "error": node.error,
            "address": node.address,
            "agent": {"version": node.agent.version, "running": node.agent.running},
            "gpus": [{"index": g.index, "name": g.name, "vendor": g.vendor,
                      "utilization_percent": g.utilization_percent,
                      "memory_used_bytes": g.memory_used_bytes,
                      "memory_bytes": g.memory_bytes, "temperature_c": g.temperature_c,
                      "power_w": g.power_w}
                     for g in node.gpus],
            "instances": _instances(before, after, elapsed, name, node),
        }
    routers: dict[str, Any] = {}
    for name, sample in sorted(after.routers.items()):
        earlier = before.routers.get(name) if before is not None else None
        if sample is None:
            routers[name] = {"listen": after.listen, "up": False}
        elif earlier is None or sample.counters["requests"] < earlier.counters["requests"]:
            routers[name] = {"listen": after.listen, "up": True, "requests_per_second": None,
                             "tokens_per_second": None, "error_rate": None, "users": {}}
        else:
            routers[name] = {"listen": after.listen, "up": True,
                             **rates(earlier.counters, sample.counters, elapsed)}
    return {"nodes": nodes, "routers": routers}
