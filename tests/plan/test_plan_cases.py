"""Runs every plan case folder in tests/plan/cases/ (one generic runner).

A case folder holds `case.json` (`stack`, `facts`, `evaluations` as in tests/schedule;
`applied: true` first turns the facts into what a successful apply of `stack` leaves,
then `stack_after` (optional) is planned against them, with `facts_after` merged into
their nodes; `recorded: true` makes those facts also report what that apply wrote: the
files of its plan, `managed`, and the stack's record, `stacks`) and the golden files `plan.json`
(the `--json` form) and `plan.txt` (the rendered text). `STACK_UPDATE_GOLDEN=1` rewrites
the golden files; review the diff before committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import stack.catalog
from stack.assign import build_assignments
from stack.catalog import Recipe, catalogue, recipe
from stack.neighbours import own_record
from stack.pipeline import Evaluations, plan_evaluated
from stack.plan import Plan
from stack.render import render_plan
from stack.schedule import schedule, with_instances
from stack.snapshot import ManagedFile, NodeFacts, Observed
from stack.spec import StackSpec
from tests.schedule.cases_lib import load_evaluations, load_facts, load_stack, read_case

CASES = sorted(p for p in (Path(__file__).parent / "cases").iterdir() if p.is_dir())
AGENT = "0.1.0"


def make(case: dict[str, Any]) -> Plan:
    spec, text = load_stack(case["stack"])
    facts = load_facts(case["facts"])
    evaluations = load_evaluations(case["evaluations"], spec)
    if case.get("applied"):
        facts = applied(case, spec, text, facts, evaluations)
        if "stack_after" in case:
            spec, text = load_stack(case["stack_after"])
            evaluations = load_evaluations(case.get("evaluations_after", case["evaluations"]), spec)
        for name, change in case.get("facts_after", {}).items():
            # checked like a snapshot: `"agent": {}` is what an unreachable host reports
            facts.nodes[name] = NodeFacts.model_validate(
                {**facts.nodes[name].model_dump(), **change})
    return plan_evaluated(spec, text, facts, Evaluations(evaluations), Path("/nonexistent"),
                          AGENT)


def applied(case: dict[str, Any], spec: StackSpec, text: str, facts: Observed,
            evaluations: Any) -> Observed:
    """The facts once a successful apply of `spec` ran on `facts`."""
    placed = schedule(spec, evaluations, facts)
    assignments = build_assignments(spec, placed, facts, Path("/nonexistent"), None)
    hashes = {i.id: i.spec_hash() for a in assignments.values() for i in a.instances}
    facts = with_instances(facts, placed, hashes, agent_version=AGENT)
    if case.get("recorded"):
        facts = _recorded(facts, plan_evaluated(spec, text, facts, Evaluations(evaluations),
                                                Path("/nonexistent"), AGENT), spec)
    return facts.model_copy(update={"nodes": {
        name: node.model_copy(update=_installed(spec, placed, name, node))
        for name, node in facts.nodes.items()}})


def _recorded(facts: Observed, applied: Plan, spec: StackSpec) -> Observed:
    """The facts once `applied` was carried out: its files as `state/managed` lists them
    (unchanged since), and this stack's record on each host."""
    return facts.model_copy(update={"nodes": {
        name: node.model_copy(update={
            "managed": {f.path: ManagedFile(kind=f.kind, fingerprint=f.fingerprint,
                                            written="0" * 64, sha256="0" * 64)
                        for f in applied.files.get(name, ())},
            "stacks": [*(node.stacks or []), own_record(spec, name)]})
        for name, node in facts.nodes.items()}})


def _installed(spec: StackSpec, placed: Any, node: str, facts: NodeFacts) -> dict[str, Any]:
    """The runtime folders on `node` once apply installed what its parts use, and the
    recipe each was installed by."""
    out = {k: list(v) for k, v in facts.runtimes.items()}
    recipes = {k: dict(v) for k, v in (facts.runtime_recipes or {}).items()}
    for p in placed.placements:
        for part, vendor in ((p.node, p.vendor), *((w.node, w.vendor) for w in p.workers)):
            if part == node and p.backend_version:
                versions = out.setdefault(p.runtime, [])
                found = recipe(spec, p.runtime, p.backend_version, vendor)
                got = found.folder if isinstance(found, Recipe) else p.backend_version
                if got not in versions:
                    versions.append(got)
                if isinstance(found, Recipe):
                    recipes.setdefault(p.runtime, {})[got] = found.digest
    return {"runtimes": out, "runtime_recipes": recipes}


@pytest.mark.parametrize("folder", CASES, ids=[p.name for p in CASES])
def test_plan_case(folder: Path) -> None:
    case = read_case(folder / "case.json")
    result = make(case)
    got_json = json.dumps(result.to_json(), indent=2) + "\n"
    got_text = render_plan(result)
    if os.environ.get("STACK_UPDATE_GOLDEN"):
        (folder / "plan.json").write_text(got_json)
        (folder / "plan.txt").write_text(got_text)
    assert got_json == (folder / "plan.json").read_text()
    assert got_text == (folder / "plan.txt").read_text()
    assert Plan.from_json(json.loads(got_json)) == result, "the saved plan reads back the same"
    for key, value in case.get("expect", {}).items():
        assert result.to_json()[key] == value, key


def test_a_runtime_installed_by_an_older_recipe_is_installed_again_and_its_replica_restarts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalogue's vLLM recipe gained `ray` after a fleet installed it: the plan installs
    that folder again (a replace, not a no-op) and restarts the replica that runs from it;
    nothing else changes."""
    case = read_case(Path(__file__).parent / "cases" / "catalogue_runtimes_no_changes_after_apply"
                     / "case.json")
    spec, text = load_stack(case["stack"])
    evaluations = load_evaluations(case["evaluations"], spec)
    now = catalogue()
    assert now["vllm"].requirements, "the catalogue's vLLM recipe adds requirements"
    with monkeypatch.context() as older:
        older.setattr(stack.catalog, "catalogue",
                      lambda: {**now, "vllm": now["vllm"].model_copy(update={"requirements": []})})
        facts = applied(case, spec, text, load_facts(case["facts"]), evaluations)
    result = plan_evaluated(spec, text, facts, Evaluations(evaluations), Path("/nonexistent"),
                            AGENT)
    changes = {c.address: (c.action.value, c.reason) for c in result.changes}
    runtime = "node.gpu-amd.runtime.vllm@0.18.0-rocm"  # qwen fits the larger GPU
    assert set(changes) == {runtime, "model.qwen.replica[0]"}, changes
    assert changes[runtime][0] == "replace" and "its recipe changed" in changes[runtime][1]
    assert changes["model.qwen.replica[0]"] == ("replace",
                                        "its runtime is installed again (recipe changed)")
    # once it ran, the facts record the new recipe: the same plan is empty
    again = applied(case, spec, text, load_facts(case["facts"]), evaluations)
    assert plan_evaluated(spec, text, again, Evaluations(evaluations), Path("/nonexistent"),
                          AGENT).changes == ()
