"""The rows of `stack status` (and each `--watch` frame) from two reads of the fleet: rates
are deltas between the reads, unknown (None) on the first read or after a restart, and the
per-replica TTFT median comes from the router's own histogram buckets."""

from __future__ import annotations

from typing import Any

from router.metrics import Metrics, ReplicaGauge
from stack.snapshot import AgentFacts, InstanceFacts, NodeFacts
from stack.statusview import Reading, median_from_buckets, parse_router_metrics, status_view

GAUGES = [ReplicaGauge("gemma", "gemma-0", 2, True), ReplicaGauge("gemma", "gemma-1", 0, True)]


def _node(restarts: int = 0) -> NodeFacts:
    inst = InstanceFacts(id="gemma-0", model="gemma", replica=0, backend="llama.cpp",
                         port=40001, host="10.0.0.1", state="ready", restarts=restarts)
    return NodeFacts(address="10.0.0.1", agent=AgentFacts(running=True, instances=[inst]))


def _reading(router: Metrics | None, node: NodeFacts,
             engine: dict[str, Any] | None = None) -> Reading:
    """A read of one node; `engine`: what its agent's /v1/status says of gemma-0's engine."""
    sample = None if router is None else parse_router_metrics(router.render(GAUGES).decode())
    engines = {"node-01": {"gemma-0": {"backend": "llama.cpp", "up": True, **engine}}
               if engine is not None else {}}
    return Reading(nodes={"node-01": node}, routers={"node-01": sample}, listen="10.0.0.1:8080",
                   engines=engines)


def _instance(view: dict[str, Any]) -> dict[str, Any]:
    inst: dict[str, Any]
    [inst] = view["nodes"]["node-01"]["instances"]
    return inst


def test_first_read_shows_rates_as_unknown_not_zero() -> None:
    view = status_view(None, _reading(Metrics(), _node(), {"prompt_tokens_total": 5,
                                                           "generation_tokens_total": 5}), 0.0)
    inst = _instance(view)
    assert inst["tokens_per_second"] is None and inst["ttft_p50_seconds"] is None
    assert inst["requests_in_flight"] == 2  # the router's gauge, no engine gauge
    assert view["routers"]["node-01"]["requests_per_second"] is None


def test_ttft_median_is_taken_from_the_bucket_deltas_of_that_replica_only() -> None:
    m = Metrics()
    for _ in range(50):
        m.first_token("gemma", "gemma-0", 9.0)  # before the first read: not in the median
    before = _reading(m, _node())
    for seconds in (0.02, 0.03, 0.04, 0.2):
        m.first_token("gemma", "gemma-0", seconds)
    for _ in range(9):
        m.first_token("gemma", "gemma-1", 20.0)  # another replica
    inst = _instance(status_view(before, _reading(m, _node()), 2.0))
    # 4 new observations in (0.01, 0.025], (0.025, 0.05] x2, (0.1, 0.25]: rank 2 falls in
    # the second bucket, at half of it
    assert inst["ttft_p50_seconds"] == 0.0375


def test_tokens_per_second_come_from_the_engine_counters_and_its_gauge_wins() -> None:
    before = _reading(Metrics(), _node(), {"prompt_tokens_total": 100,
                                           "generation_tokens_total": 50})
    after = _reading(Metrics(), _node(), {"prompt_tokens_total": 160,
                                          "generation_tokens_total": 90, "requests_running": 1})
    inst = _instance(status_view(before, after, 4.0))
    assert inst["tokens_per_second"] == 25.0
    assert inst["requests_in_flight"] == 1  # the engine's, not the router's 2


def test_a_restart_or_unknown_engine_counters_give_unknown_tokens_per_second() -> None:
    engine = {"prompt_tokens_total": 100, "generation_tokens_total": 50}
    restarted = status_view(_reading(Metrics(), _node(0), engine),
                            _reading(Metrics(), _node(1), {**engine, "prompt_tokens_total": 400}),
                            2.0)
    assert _instance(restarted)["tokens_per_second"] is None
    unknown = status_view(_reading(Metrics(), _node(0), engine),
                          _reading(Metrics(), _node(0), {**engine, "prompt_tokens_total": None}),
                          2.0)
    assert _instance(unknown)["tokens_per_second"] is None
    unread = status_view(_reading(Metrics(), _node(0), engine),
                         _reading(Metrics(), _node(0), {**engine, "prompt_tokens_total": 400,
                                                        "up": False}), 2.0)
    assert _instance(unread)["tokens_per_second"] is None  # the agent's last read failed
    no_engine = status_view(_reading(Metrics(), _node()), _reading(Metrics(), _node()), 2.0)
    assert _instance(no_engine)["tokens_per_second"] is None


def test_router_rates_and_5xx_share_between_reads() -> None:
    m = Metrics()
    m.request("gemma", "k", "", 200, 0.1)
    before = _reading(m, _node())
    for status in (200, 200, 200, 502):
        m.request("gemma", "k", "", status, 0.1)
    m.usage("gemma", "k", "", 30, 10)
    router = status_view(before, _reading(m, _node()), 2.0)["routers"]["node-01"]
    assert router["requests_per_second"] == 2.0 and router["tokens_per_second"] == 20.0
    assert router["error_rate"] == 0.25
    restarted = status_view(_reading(m, _node()), _reading(Metrics(), _node()), 2.0)
    assert restarted["routers"]["node-01"]["requests_per_second"] is None


def test_a_silent_router_is_shown_down() -> None:
    view = status_view(_reading(Metrics(), _node()), _reading(None, _node()), 2.0)
    assert view["routers"]["node-01"] == {"listen": "10.0.0.1:8080", "up": False}
    assert _instance(view)["requests_in_flight"] is None


def test_median_from_buckets_interpolates_and_needs_observations() -> None:
    inf = float("inf")
    assert median_from_buckets({}, {1.0: 0, 2.0: 10, inf: 10}) == 1.5
    assert median_from_buckets({1.0: 3, inf: 3}, {1.0: 3, inf: 3}) is None
    assert median_from_buckets({}, {1.0: 0, inf: 4}) == 1.0  # beyond the last bound
    assert median_from_buckets({1.0: 5, inf: 5}, {1.0: 1, inf: 1}) is None  # a reset


def test_router_keeps_per_replica_ttft_only_for_replicas_it_knows() -> None:
    m = Metrics()
    m.first_token("gemma", "gemma-0", 0.3)
    m.first_token("gemma", "gone-0", 0.3)
    text = m.render(GAUGES).decode()
    assert ('modelstack_router_replica_time_to_first_token_seconds_bucket{model="gemma",'
            'replica="gemma-0",le="0.5"} 1') in text
    assert 'replica="gone-0"' not in text
    assert 'modelstack_router_time_to_first_token_seconds_count{model="gemma"} 2' in text
    merged = Metrics()
    other = Metrics()
    other.first_token("gemma", "gemma-0", 0.3)
    merged.merge(m.snapshot(GAUGES))
    merged.merge(other.snapshot(GAUGES))
    sample = parse_router_metrics(merged.render(GAUGES).decode())
    assert sample.ttft_buckets[("gemma", "gemma-0")][float("inf")] == 2
