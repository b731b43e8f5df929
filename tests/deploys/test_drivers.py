"""Driver decisions as data: each `drivers/*.json` holds a host's facts, the driver
setting, and the exact commands (or the blocking reason) expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploys.drivers import Blocked, DriverRequest, driver_commands, needs_reboot
from stack.snapshot import NodeFacts

CASES = sorted((Path(__file__).parent / "drivers").glob("*.json"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_driver_commands_match_the_case(path: Path) -> None:
    case = json.loads(path.read_text())
    facts = NodeFacts.model_validate(case["facts"])
    result = driver_commands(facts, DriverRequest(**case["request"]))
    expect = case["expect"]
    if "blocked" in expect:
        assert isinstance(result, Blocked), result
        for part in expect["blocked"]:
            assert part in result.reason + " hint: " + result.hint
    else:
        assert result == expect["commands"]
        assert needs_reboot(facts, result) == expect["reboot"]


def test_there_are_cases_for_each_supported_distro() -> None:
    distros = {json.loads(p.read_text())["facts"].get("distro", "") for p in CASES}
    for wanted in ("ubuntu 22.04", "ubuntu 24.04", "debian 12", "rhel 9.4"):
        assert wanted in distros
