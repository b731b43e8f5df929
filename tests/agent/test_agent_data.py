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
