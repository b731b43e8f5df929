"""Runs every scheduler case in tests/schedule/cases/*.json (one generic runner).

A case: `stack` (TOML text or table), `facts` (a snapshot; GPUs may use the shorthand of
cases_lib), `evaluations` (per model, the sizes `FixedEvaluation` turns into claims), and
`expect`: `placements` (each listed key must match; every placed replica must be listed)
and `unschedulable` (model, replica and the exact reasons). `replan` (optional) applies
the placements to the facts as a successful apply would, swaps in another stack, and
checks the new expectation plus `unchanged`: replicas that must keep node, GPUs and port.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stack.errors import Problem
from stack.schedule import Placements, schedule, with_instances
from stack.snapshot import Observed
from tests.schedule.cases_lib import load_evaluations, load_facts, load_stack, read_case

CASES = sorted((Path(__file__).parent / "cases").glob("*.json"))


def _check(result: Placements, expect: dict[str, Any]) -> None:
    got = {(p.model, p.replica): p.to_json() for p in result.placements}
    want = {(p["model"], p["replica"]): p for p in expect.get("placements", [])}
    assert sorted(got) == sorted(want), f"placed {sorted(got)}, expected {sorted(want)}"
    for key, fields in want.items():
        for name, value in fields.items():
            assert got[key][name] == value, f"{key} {name}: got {got[key][name]!r}, want {value!r}"
    unsched = [u.to_json() for u in result.unschedulable]
    assert unsched == expect.get("unschedulable", []), unsched


def _run(case: dict[str, Any], facts: Observed, stack: Any) -> Placements:
    spec, _ = load_stack(stack)
    evaluations = load_evaluations(case["evaluations"], spec)
    failed = {name: Problem(why) for name, why in case.get("failed", {}).items()}
    first = schedule(spec, evaluations, facts, failed=failed)
    again = schedule(spec, load_evaluations(case["evaluations"], spec), facts, failed=failed)
    assert first == again, "the same inputs gave different placements"
    return first


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_schedule_case(path: Path) -> None:
    case = read_case(path)
    facts = load_facts(case["facts"])
    result = _run(case, facts, case["stack"])
    _check(result, case["expect"])
    replan = case.get("replan")
    if replan:
        after = with_instances(facts, result)
        second = _run({**case, **replan}, after, replan.get("stack", case["stack"]))
        _check(second, replan["expect"])
        for model, replica in replan.get("unchanged", []):
            before, now = result.get(model, replica), second.get(model, replica)
            assert before and now
            assert (now.node, now.gpus, now.port) == (before.node, before.gpus, before.port)
