"""`stack status` reads the routers' /metrics: totals, and each user's requests and tokens
per second, from the text the router's own Metrics renders (user names escaped)."""

from __future__ import annotations

from router.metrics import Metrics
from stack.statusview import parse_router_metrics, rates


def _page(requests: int, tokens: int) -> str:
    m = Metrics()
    for _ in range(requests):
        m.request("gemma", "laptop", "alice", 200, 0.01)
        m.request("gemma", "ci", 'odd"one', 200, 0.01)
        m.request("gemma", "anon-key", "", 429, 0.01)
    m.usage("gemma", "laptop", "alice", tokens, tokens)
    return m.render([]).decode()


def test_status_counts_per_user_as_well_as_in_all() -> None:
    first = parse_router_metrics(_page(2, 10)).counters
    second = parse_router_metrics(_page(5, 40)).counters
    assert first["requests"] == 6 and first["user:alice:requests"] == 2
    assert first['user:odd"one:requests'] == 2
    got = rates(first, second, 2.0)
    assert got["requests_per_second"] == 4.5 and got["tokens_per_second"] == 30.0
    assert got["users"]["alice"] == {"requests_per_second": 1.5, "tokens_per_second": 30.0}
    assert "anon-key" not in str(got["users"])
