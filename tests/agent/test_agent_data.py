"""Pure parts of the agent from data cases: assignment validation and model sources."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.models import parse_source
from agent.reconcile import parse_assignment

HERE = Path(__file__).parent
ASSIGNMENTS = sorted((HERE / "assignments").glob("*.json"))
SOURCES = sorted((HERE / "sources").glob("*.json"))
# plans the controller wrote (golden files of tests/plan): what `stack apply` sends
PLANS = sorted(HERE.parent.glob("*/cases/*/plan.json"))


@pytest.mark.parametrize("case_file", ASSIGNMENTS, ids=[c.stem for c in ASSIGNMENTS])
def test_assignment_case(case_file: Path) -> None:
    case = json.loads(case_file.read_text())
    if case["error"] is None:
        parsed = parse_assignment(case["assignment"], case["node"])
        wanted = [i["id"] for i in case["assignment"]["instances"]]
        assert [i.id for i in parsed.instances] == wanted
        return
    with pytest.raises(AgentError) as err:
        parse_assignment(case["assignment"], case["node"])
    assert case["error"] in err.value.message
    assert err.value.hint


@pytest.mark.parametrize("plan_file", PLANS, ids=[p.parent.name for p in PLANS])
def test_every_assignment_the_controller_plans_passes_the_agent_schema(plan_file: Path) -> None:
    # a plan keeps assignments without the version and keys; apply adds both
    key = "sk-" + "Kq9_-" * 8 + "x2Z"  # the form of stack.secrets.derive_key's keys
    for node, planned in json.loads(plan_file.read_text())["assignments"].items():
        sent = {"format_version": 1, **planned, "instances": [
            {**i, "api_key": key if i["role"] != "worker" else None}
            for i in planned["instances"]]}
        assert parse_assignment(sent, node).model_dump(mode="json") == sent


def test_plan_golden_files_are_found() -> None:
    assert len(PLANS) >= 10


@pytest.mark.parametrize("case_file", SOURCES, ids=[c.stem for c in SOURCES])
def test_source_case(case_file: Path) -> None:
    case = json.loads(case_file.read_text())
    expect = case["expect"]
    if "error" in expect:
        with pytest.raises(ValueError, match=None) as err:
            parse_source(case["source"])
        assert expect["error"] in str(err.value)
        return
    assert dataclasses.asdict(parse_source(case["source"])) == expect
