"""Prometheus metrics of one router process, rendered as text format 0.0.4.

Hand-rolled counters (plain dicts) because they sit on the hot path. Labels are bounded:
model names from the config, key and user names (never keys), status classes, replica ids. With
several workers, `snapshot` and `merge` carry one worker's counters to the one that
answers `/metrics` (router/shared.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

PREFIX = "modelstack_router_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)


@dataclass(slots=True)
class Histogram:
    """Cumulative-on-render histogram."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value

    def add(self, counts: list[int], total: float) -> None:
        """Add another process's histogram (its per-bucket counts and sum)."""
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.total += total

    def lines(self, name: str, labels: str) -> Iterable[str]:
        """Its `_bucket`, `_sum` and `_count` lines; `labels` are the others, with a comma."""
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), self.counts, strict=True):
            running += count
            yield f'{PREFIX}{name}_bucket{{{labels}le="{bound}"}} {running}\n'
        yield f"{PREFIX}{name}_sum{{{labels.rstrip(',')}}} {self.total:.6f}\n"
        yield f"{PREFIX}{name}_count{{{labels.rstrip(',')}}} {running}\n"


@dataclass(frozen=True, slots=True)
class ReplicaGauge:
    """What /metrics shows about one replica."""

    model: str
    replica: str
    in_flight: int
    up: bool


@dataclass(slots=True)
class Metrics:
    """All counters of this process."""

    requests: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    """(model, key, user or "", status class) -> requests."""
    latency: dict[str, Histogram] = field(default_factory=dict)
    ttft: dict[str, Histogram] = field(default_factory=dict)
    replica_ttft: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    """(model, replica) -> time to first token; shown only for replicas the router knows."""
    tokens: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    """(model, key, user or "", prompt or completion) -> tokens."""
    retries: dict[str, int] = field(default_factory=dict)
    rate_limited: dict[tuple[str, str], int] = field(default_factory=dict)
    ejections: dict[tuple[str, str], int] = field(default_factory=dict)
    store_fallbacks: dict[str, int] = field(default_factory=dict)
    """Requests admitted here (`local`) or refused (`refuse`) while the store was down."""
    store: list[int] = field(default_factory=lambda: [-1, 0])
    """The shared limit store as this process sees it: up (1), down (0), none (-1); and
    how often it changed."""

    def request(self, model: str, key: str, user: str, status: int, seconds: float) -> None:
        label = (model, key, user, f"{status // 100}xx")
        self.requests[label] = self.requests.get(label, 0) + 1
        hist = self.latency.get(model)
        if hist is None:
            hist = self.latency[model] = Histogram()
        hist.observe(seconds)

    def first_token(self, model: str, replica: str, seconds: float) -> None:
        (self.ttft.get(model) or self.ttft.setdefault(model, Histogram())).observe(seconds)
        label = (model, replica)
        (self.replica_ttft.get(label) or self.replica_ttft.setdefault(label, Histogram())
         ).observe(seconds)

    def _forget_replicas(self, known: list[ReplicaGauge]) -> None:
        """Drop the per-replica histograms of replicas the router no longer has (a new
        config), so their number stays bounded by the config's replicas."""
        keep = {(g.model, g.replica) for g in known}
        for label in [k for k in self.replica_ttft if k not in keep]:
            del self.replica_ttft[label]

    def usage(self, model: str, key: str, user: str, prompt: int, completion: int) -> None:
        for kind, value in (("prompt", prompt), ("completion", completion)):
            label = (model, key, user, kind)
            self.tokens[label] = self.tokens.get(label, 0) + value

    def retried(self, model: str) -> None:
        self.retries[model] = self.retries.get(model, 0) + 1

    def limited(self, key: str, limit: str) -> None:
        label = (key, limit)
        self.rate_limited[label] = self.rate_limited.get(label, 0) + 1

    def store_fallback(self, action: str) -> None:
        self.store_fallbacks[action] = self.store_fallbacks.get(action, 0) + 1

    def ejected(self, model: str, replica: str) -> None:
        label = (model, replica)
        self.ejections[label] = self.ejections.get(label, 0) + 1

    def snapshot(self, replicas: Iterable[ReplicaGauge]) -> bytes:
        """This process's counters and replica gauges as JSON, for `merge` elsewhere."""
        gauges = list(replicas)
        self._forget_replicas(gauges)
        return orjson.dumps({
            "requests": [[*k, n] for k, n in self.requests.items()],
            "latency": {m: [h.counts, h.total] for m, h in self.latency.items()},
            "ttft": {m: [h.counts, h.total] for m, h in self.ttft.items()},
            "replica_ttft": [[m, r, h.counts, h.total]
                             for (m, r), h in self.replica_ttft.items()],
            "tokens": [[*k, n] for k, n in self.tokens.items()],
            "retries": self.retries,
            "rate_limited": [[*k, n] for k, n in self.rate_limited.items()],
            "ejections": [[*k, n] for k, n in self.ejections.items()],
            "store_fallbacks": self.store_fallbacks,
            "store": self.store,
            "replicas": [[g.model, g.replica, g.in_flight, g.up] for g in gauges],
        })

    def merge(self, data: bytes) -> list[ReplicaGauge]:
        """Add a `snapshot` into these counters; returns its replica gauges."""
        doc: dict[str, Any] = orjson.loads(data)
        for name in ("requests", "tokens", "rate_limited", "ejections"):
            table: dict[Any, int] = getattr(self, name)
            for *label, n in doc[name]:
                key = tuple(label)
                table[key] = table.get(key, 0) + n
        for name in ("retries", "store_fallbacks"):
            by_label: dict[str, int] = getattr(self, name)
            for label, n in doc[name].items():
                by_label[label] = by_label.get(label, 0) + n
        up, changes = doc["store"]
        if up >= 0:  # up only while every worker has it up
            self.store[0] = up if self.store[0] < 0 else min(self.store[0], up)
        self.store[1] += changes
        for name in ("latency", "ttft"):
            hists: dict[str, Histogram] = getattr(self, name)
            for model, (counts, total) in doc[name].items():
                hists.setdefault(model, Histogram()).add(counts, total)
        for model, replica, counts, total in doc["replica_ttft"]:
            self.replica_ttft.setdefault((model, replica), Histogram()).add(counts, total)
        return [ReplicaGauge(m, r, n, up) for m, r, n, up in doc["replicas"]]

    def render(self, replicas: Iterable[ReplicaGauge], workers: int | None = None) -> bytes:
        """Text format; `workers` (several-worker routers) is how many workers are counted."""
        out: list[str] = []
        p = PREFIX

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {p}{name} {text}\n# TYPE {p}{name} {kind}\n")

        head("requests_total", "counter",
             "Requests by model, key name, user (of keys that have one) and status class.")
        for (model, key, user, cls), n in sorted(self.requests.items()):
            out.append(f'{p}requests_total{{model="{_esc(model)}",key="{_esc(key)}",'
                       f'{_user(user)}status="{cls}"}} {n}\n')
        for name, hists, text in (
            ("request_duration_seconds", self.latency, "Time from request to last byte."),
            ("time_to_first_token_seconds", self.ttft, "Time to the first streamed chunk."),
        ):
            head(name, "histogram", text)
            for model, hist in sorted(hists.items()):
                out.extend(hist.lines(name, f'model="{_esc(model)}",'))
        head("tokens_total", "counter",
             "Prompt and completion tokens by model, key name and user.")
        for (model, key, user, kind), n in sorted(self.tokens.items()):
            out.append(f'{p}tokens_total{{model="{_esc(model)}",key="{_esc(key)}",'
                       f'{_user(user)}type="{kind}"}} {n}\n')
        head("retries_total", "counter", "Requests retried on another replica.")
        for model, n in sorted(self.retries.items()):
            out.append(f'{p}retries_total{{model="{_esc(model)}"}} {n}\n')
        head("rate_limited_total", "counter",
             "Requests refused by a key's (or its user's: user_rpm, user_tpm) limit.")
        for (key, limit), n in sorted(self.rate_limited.items()):
            out.append(f'{p}rate_limited_total{{key="{_esc(key)}",limit="{limit}"}} {n}\n')
        head("replica_ejections_total", "counter", "Replicas ejected after failures.")
        for (model, replica), n in sorted(self.ejections.items()):
            out.append(f'{p}replica_ejections_total{{model="{_esc(model)}",'
                       f'replica="{_esc(replica)}"}} {n}\n')
        if self.store[0] >= 0:
            head("limit_store_up", "gauge", "1 while the shared limit store answers.")
            out.append(f"{p}limit_store_up {self.store[0]}\n")
            head("limit_store_changes_total", "counter",
                 "Times the shared limit store went down or came back.")
            out.append(f"{p}limit_store_changes_total {self.store[1]}\n")
            head("limit_store_fallbacks_total", "counter", "Limited requests admitted by "
                 "this router alone (local) or refused (refuse) while the store was down.")
            for action, n in sorted(self.store_fallbacks.items()):
                out.append(f'{p}limit_store_fallbacks_total{{action="{action}"}} {n}\n')
        gauges = list(replicas)
        self._forget_replicas(gauges)
        head("replica_time_to_first_token_seconds", "histogram",
             "Time to the first streamed chunk, per replica.")
        for (model, replica), hist in sorted(self.replica_ttft.items()):
            out.extend(hist.lines("replica_time_to_first_token_seconds",
                                  f'model="{_esc(model)}",replica="{_esc(replica)}",'))
        head("replica_in_flight", "gauge", "Requests outstanding on a replica.")
        for g in gauges:
            out.append(f'{p}replica_in_flight{{model="{_esc(g.model)}",'
                       f'replica="{_esc(g.replica)}"}} {g.in_flight}\n')
        head("replica_up", "gauge", "1 when the replica takes requests.")
        for g in gauges:
            out.append(f'{p}replica_up{{model="{_esc(g.model)}",'
                       f'replica="{_esc(g.replica)}"}} {int(g.up)}\n')
        if workers is not None:
            head("workers", "gauge", "Worker processes whose counters this scrape includes.")
            out.append(f"{p}workers {workers}\n")
        return "".join(out).encode()


def combine(gauges: Iterable[ReplicaGauge]) -> list[ReplicaGauge]:
    """One gauge per replica over several workers: in-flight summed, up only if up in all."""
    merged: dict[tuple[str, str], ReplicaGauge] = {}
    for g in gauges:
        prev = merged.get((g.model, g.replica))
        merged[(g.model, g.replica)] = g if prev is None else ReplicaGauge(
            g.model, g.replica, prev.in_flight + g.in_flight, prev.up and g.up)
    return list(merged.values())


def _user(user: str) -> str:
    """The `user` label and its comma, for keys that belong to a user."""
    return f'user="{_esc(user)}",' if user else ""


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
