"""Data-driven cases for the router's pure parts: one JSON file per case under cases/<part>/."""

from __future__ import annotations

import json
from pathlib import Path
from random import Random
from typing import Any

import pytest

from router import config as router_config
from router.balance import Load, choose
from router.errors import ConfigError
from router.health import ReplicaHealth
from router.limits import KeyLimiter
from router.usage import Usage, take_usage

CASES = Path(__file__).parent / "cases"


def _cases(part: str) -> list[Any]:
    return [pytest.param(json.loads(p.read_text()), id=p.stem)
            for p in sorted((CASES / part).glob("*.json"))]


@pytest.mark.parametrize("case", _cases("config"))
def test_config_case(case: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    path.write_text(case["text"] if "text" in case else json.dumps(case["config"]))
    if "error" not in case:
        router_config.load(path)
        return
    with pytest.raises(ConfigError) as info:
        router_config.load(path)
    rendered = info.value.render()
    for part in case["error"]:
        assert part in rendered.replace(str(path), "FILE"), rendered
    assert "\nhint: " in rendered


def test_clients_left_at_the_defaults_are_not_written() -> None:
    # router.json files (and their fingerprints in plans) from before `clients` stay the same
    assert "clients" not in router_config.RouterConfig().model_dump()
    tuned = router_config.RouterConfig(clients=router_config.Clients(max_connections=10))
    assert tuned.model_dump()["clients"]["max_connections"] == 10


@pytest.mark.parametrize("case", _cases("listen"))
def test_listen_case(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(ValueError) as info:
            router_config.parse_listen(case["listen"])
        assert str(info.value) == case["error"]
        return
    host, port = router_config.parse_listen(case["listen"])
    assert (host, port) == (case["host"], case["port"])
    assert router_config.is_loopback(host) == case["loopback"]


@pytest.mark.parametrize("case", _cases("balance"))
def test_balance_case(case: dict[str, Any]) -> None:
    loads = [Load(c["id"], c["outstanding"], c.get("weight", 1), c.get("latency", 0.0))
             for c in case["replicas"]]
    rng = Random(case.get("seed", 0))
    sessions = case.get("affinities", [case.get("affinity")])
    picks = [choose(loads, rng, session) for session in sessions
             for _ in range(case.get("repeat", 1))]
    chosen = {None if i is None else loads[i].id for i in picks}
    assert chosen == set(case["expect"])


@pytest.mark.parametrize("case", _cases("limits"))
def test_limits_case(case: dict[str, Any]) -> None:
    limiter = KeyLimiter(case.get("rpm"), case.get("tpm"))
    reservations: list[tuple[int, int]] = []
    for step in case["steps"]:
        if "settle" in step:
            limiter.settle(step["at"], reservations[step["settle"]], step["used"])
            continue
        verdict = limiter.admit(step["at"], step.get("estimate", 0))
        reservations.append(verdict.reservation)
        assert verdict.ok == step["ok"], step
        if not step["ok"]:
            assert verdict.reason == step["reason"]
            assert verdict.retry_after == step["retry_after"]


@pytest.mark.parametrize("case", _cases("health"))
def test_health_case(case: dict[str, Any]) -> None:
    health = ReplicaHealth(case.get("eject_after", 3), case.get("backoff_max", 60.0))
    for step in case["steps"]:
        event, at = step["event"], step["at"]
        if event == "fail":
            assert health.failed(at) == step.get("ejected", False), step
        elif event == "ok":
            health.succeeded()
        elif event == "pick":
            assert health.available(at), step
            health.picked()
        if "available" in step:
            assert health.available(at) == step["available"], step
        if "state" in step:
            assert health.state == step["state"], step


@pytest.mark.parametrize("case", _cases("usage"))
def test_usage_case(case: dict[str, Any]) -> None:
    usage = Usage()
    if "body" in case:
        usage.count(case["body"].encode())
    else:
        usage.drop = case["drop"]
        assert take_usage(case["events"].encode(), usage).decode() == case["passed_on"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (case["prompt"], case["completion"])
