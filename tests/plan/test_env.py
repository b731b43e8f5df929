"""`env` values from the controller's environment (`{ from_env = "NAME" }`): located
errors when unset, a plan that shows a new value without holding it, and apply filling
the values in only when they still match the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stack.assign import build_assignments
from stack.env import env_digests, with_env_values
from stack.errors import ConfigError
from stack.pipeline import Evaluations, controller_env_digests, plan_evaluated
from stack.plan import Plan
from stack.render import render_plan
from stack.schedule import schedule, with_instances
from tests.schedule.cases_lib import load_evaluations, load_facts, load_stack

SECRET = b"s" * 32
STACK = """[stack]
name = "lab"

[runtimes."llama.cpp"]
versions = ["b6700"]
source = "build"
url = "https://github.com/ggml-org/llama.cpp/archive/{version}.tar.gz"

[nodes."*"]
env = { HF_TOKEN = { from_env = "LAB_HF_TOKEN" }, HF_ENDPOINT = "https://hf.example" }

[models.gemma]
source = "hf://ggml-org/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q4_K_M.gguf"
backend = "llama.cpp"
env = { PROXY_PASSWORD = { from_env = "LAB_PROXY_PASSWORD" }, HF_ENDPOINT = "https://m.example" }
"""
FACTS = {"nodes": {"cpu-01": {"address": "10.0.0.11", "memory_bytes": 64 * 2**30,
                              "disk_free_bytes": 10**12, "cpu_inference": True}}}
EVALUATIONS = {"gemma": {"weights": "253MB", "backends": ["llama.cpp"], "format": "gguf",
                         "ram": "300MiB"}}
FIRST = {"LAB_HF_TOKEN": "hf_first_value_1234", "LAB_PROXY_PASSWORD": "pw-first-5678"}
SECOND = {**FIRST, "LAB_HF_TOKEN": "hf_second_value_9876"}


def _plan(environ: dict[str, str], applied_with: dict[str, str] | None = None) -> Plan:
    """The plan for STACK with `environ`, on a fleet where STACK was applied with
    `applied_with` (None: nothing applied yet)."""
    spec, text = load_stack(STACK.replace('[nodes."*"]', '[nodes."*"]\ncpu_inference = true'))
    facts = load_facts(FACTS)
    evaluations = load_evaluations(EVALUATIONS, spec)
    if applied_with is not None:
        placed = schedule(spec, evaluations, facts)
        assignments = build_assignments(spec, placed, facts, Path("/nonexistent"), None,
                                        env_digests(spec, applied_with, SECRET))
        hashes = {i.id: i.spec_hash() for a in assignments.values() for i in a.instances}
        facts = with_instances(facts, placed, hashes, agent_version="0.1.0")
    return plan_evaluated(spec, text, facts, Evaluations(evaluations), Path("/nonexistent"),
                          "0.1.0", env_digests(spec, environ, SECRET))


def _shown(plan: Plan) -> str:
    return render_plan(plan) + json.dumps(plan.to_json())


def test_a_new_secret_value_replaces_the_instance_and_neither_value_is_in_the_plan() -> None:
    same = _plan(FIRST, applied_with=FIRST)
    assert not [c for c in same.changes if c.address.startswith("model.")]
    plan = _plan(SECOND, applied_with=FIRST)
    changes = [c for c in plan.changes if c.address == "model.gemma.replica[0]"]
    assert [(c.action.value, c.reason) for c in changes] == [("replace", "args or env changed")]
    text = _shown(plan) + _shown(same)
    for value in (*FIRST.values(), *SECOND.values()):
        assert value not in text
    assert ("env:     HF_ENDPOINT, HF_TOKEN (from the controller's environment), "
            "PROXY_PASSWORD (from the controller's environment)") in render_plan(plan)


def test_the_model_env_wins_over_the_node_env_and_the_node_env_is_the_agents() -> None:
    plan = _plan(FIRST)
    assignment = plan.assignments["cpu-01"]
    inst = assignment.instances[0]
    assert inst.env == {"HF_ENDPOINT": "https://m.example"}
    assert {k: v.from_env for k, v in inst.secret_env.items()} == {
        "HF_TOKEN": "LAB_HF_TOKEN", "PROXY_PASSWORD": "LAB_PROXY_PASSWORD"}
    assert all(v.value is None for v in inst.secret_env.values())
    assert assignment.env == {"HF_ENDPOINT": "https://hf.example"}
    assert list(assignment.secret_env) == ["HF_TOKEN"]


def test_apply_fills_the_values_in_only_while_they_match_the_plan() -> None:
    plan = _plan(FIRST)
    filled = with_env_values(plan.assignments, FIRST, SECRET)
    inst = filled["cpu-01"].instances[0]
    assert inst.environment() == {"HF_ENDPOINT": "https://m.example",
                                  "HF_TOKEN": "hf_first_value_1234",
                                  "PROXY_PASSWORD": "pw-first-5678"}
    assert filled["cpu-01"].environment()["HF_TOKEN"] == "hf_first_value_1234"
    assert inst.spec_hash() == plan.assignments["cpu-01"].instances[0].spec_hash()
    with pytest.raises(ConfigError) as changed:
        with_env_values(plan.assignments, SECOND, SECRET)
    assert changed.value.message == ("`LAB_HF_TOKEN` holds another value than when the plan "
                                     "was made")
    with pytest.raises(ConfigError) as unset:
        with_env_values(plan.assignments, {"LAB_HF_TOKEN": FIRST["LAB_HF_TOKEN"]}, SECRET)
    assert "LAB_PROXY_PASSWORD" in unset.value.message
    for err in (changed.value, unset.value):
        assert not any(v in err.render() for v in (*FIRST.values(), *SECOND.values()))


def test_a_from_env_variable_that_is_not_set_is_a_located_error_with_a_hint(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec, text = load_stack(STACK)
    monkeypatch.delenv("LAB_HF_TOKEN", raising=False)
    monkeypatch.setenv("LAB_PROXY_PASSWORD", "pw-first-5678")
    with pytest.raises(ConfigError) as missing:
        controller_env_digests(spec, text, tmp_path)
    assert missing.value.message == ('`nodes."*".env.HF_TOKEN` takes its value from '
                                     "`LAB_HF_TOKEN`, which is not set in the controller's "
                                     "environment (stack.toml:10:33)")
    assert missing.value.hint.startswith("`export LAB_HF_TOKEN=...` before `stack plan`")
    monkeypatch.setenv("LAB_HF_TOKEN", "two\nlines")
    with pytest.raises(ConfigError) as newline:
        controller_env_digests(spec, text, tmp_path)
    assert "holds a control character" in newline.value.message
    assert "two" not in newline.value.render()
    monkeypatch.setenv("LAB_HF_TOKEN", "hf_first_value_1234")
    digests = controller_env_digests(spec, text, tmp_path)
    assert sorted(digests) == ["LAB_HF_TOKEN", "LAB_PROXY_PASSWORD"]
    assert not any(v in json.dumps(digests) for v in FIRST.values())


def test_a_fleet_that_runs_instances_is_not_planned_with_a_new_secret(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In CI without `$STACK_SECRET`, a new secret would give other digests than the
    apply's and every replica would look replaced: the plan refuses instead."""
    spec, text = load_stack(STACK)
    monkeypatch.delenv("STACK_SECRET", raising=False)
    for name, value in FIRST.items():
        monkeypatch.setenv(name, value)
    running = load_facts({"nodes": {"cpu-01": {
        **FACTS["nodes"]["cpu-01"],
        "agent": {"version": "0.1.0", "running": True,
                  "instances": [{"id": "gemma-0", "model": "gemma", "backend": "llama.cpp",
                                 "port": 40000, "state": "ready"}]}}}})
    with pytest.raises(ConfigError) as refused:
        controller_env_digests(spec, text, tmp_path, running)
    assert "no stack secret" in refused.value.message
    assert "STACK_SECRET" in refused.value.hint
    assert not (tmp_path / ".stack").exists()  # and none was made
    # a fleet that runs nothing yet: the first plan makes the secret, as apply would
    assert controller_env_digests(spec, text, tmp_path, load_facts(FACTS))
    assert (tmp_path / ".stack" / "secret").exists()
    monkeypatch.setenv("STACK_SECRET", "x" * 32)
    assert controller_env_digests(spec, text, tmp_path, running)
