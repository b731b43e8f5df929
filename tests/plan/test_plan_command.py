"""`stack plan` end to end: real stack.toml, real estimator on a real config.json, a facts
snapshot, the saved plan, exit codes; then the facts an apply would leave -> no changes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from stack.assign import build_assignments
from stack.config import load
from stack.placement import with_instances
from stack.plan import Plan
from stack.snapshot import Observed
from stack.wheelhouse import bundle_version

ROOT = Path(__file__).resolve().parents[2]
QWEN_CONFIG = ROOT / "tests" / "estimate" / "configs" / "qwen2.5-7b-instruct.json"
H100 = {"vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85520809984,
        "compute_capability": "9.0", "driver": "580.95.05"}
STACK = """\
[stack]
name = "lab"

[runtimes.vllm]
versions = ["0.11.0"]
source = "pip"
package = "vllm=={version}"

[models.qwen]
source = "local://models/qwen"
replicas = 2
context = 8192

[models.broken]
source = "local://models/missing"
"""


def _stack(tmp: Path, *args: str,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stack.cli", "plan",
                           "-f", str(tmp / "stack.toml"), *args],
                          capture_output=True, text=True, cwd=tmp, timeout=120,
                          env={**os.environ, **(env or {})})


def _facts(tmp: Path) -> Path:
    nodes = {name: {"address": f"10.0.0.{i}", "memory_bytes": 540 * 10**9,
                    "disk_free_bytes": 2 * 10**12, "runtimes": {"vllm": ["0.11.0"]},
                    "agent": {"version": bundle_version(), "running": True},
                    "gpus": [{**H100, "index": g, "uuid": f"GPU-{i}-{g}"} for g in range(2)]}
             for i, name in enumerate(["gpu-01", "gpu-02"], start=11)}
    path = tmp / "facts.json"
    path.write_text(json.dumps({"format_version": 1, "nodes": nodes}))
    return path


def test_plan_exits_1_naming_replicas_that_cannot_be_placed(tmp_path: Path) -> None:
    (tmp_path / "models" / "qwen").mkdir(parents=True)
    shutil.copy(QWEN_CONFIG, tmp_path / "models" / "qwen" / "config.json")
    (tmp_path / "stack.toml").write_text(STACK)
    facts = _facts(tmp_path)

    run = _stack(tmp_path, "--facts", str(facts), "--out", "plan.json", "--detailed-exitcode")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "! model.broken.replica[0]" in run.stdout  # the plan is still shown and saved
    assert (tmp_path / "plan.json").exists()
    assert run.stderr.splitlines() == [
        "error: 1 replica(s) cannot be placed: `broken` replica 0 (reasons above)",
        "hint: free or add capacity, fix the model, or pass `--allow-unschedulable` to "
        "apply the rest."]


def test_plan_with_facts_saves_a_plan_and_exits_2_then_0_after_apply(tmp_path: Path) -> None:
    (tmp_path / "models" / "qwen").mkdir(parents=True)
    shutil.copy(QWEN_CONFIG, tmp_path / "models" / "qwen" / "config.json")
    (tmp_path / "stack.toml").write_text(STACK)
    facts = _facts(tmp_path)

    run = _stack(tmp_path, "--facts", str(facts), "--out", "plan.json", "--detailed-exitcode",
                 "--allow-unschedulable")
    assert run.returncode == 2, run.stderr
    assert "+ model.qwen.replica[0]" in run.stdout
    assert "! model.broken.replica[0]" in run.stdout
    assert run.stdout.rstrip().endswith("Saved the plan to plan.json; `stack apply plan.json` "
                                        "carries it out.")
    # two replicas created; the agents are installed, so the router is updated, not created
    assert "Plan: 2 to add, 1 to change, 0 to destroy." in run.stdout
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["stack_sha256"] == hashlib.sha256(STACK.encode()).hexdigest()
    assert [p["node"] for p in saved["placements"]] == ["gpu-01", "gpu-02"]
    assert saved["placements"][0]["claim"]["vram_bytes_per_gpu"] > 15 * 10**9  # bf16 weights
    assert saved["unschedulable"][0]["model"] == "broken"

    # what apply would leave: the agents run the saved placements
    spec = load(tmp_path / "stack.toml")
    observed = Observed.model_validate_json(facts.read_text())
    placements = Plan.from_json(saved).placements
    assignments = build_assignments(spec, placements, observed, tmp_path, None)
    hashes = {i.id: i.spec_hash() for a in assignments.values() for i in a.instances}
    after = with_instances(observed, placements, hashes)
    facts.write_text(after.model_dump_json())
    again = _stack(tmp_path, "--facts", str(facts), "--detailed-exitcode",
                   "--allow-unschedulable")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "No changes to make, but some replicas cannot be placed." in again.stdout

    as_json = _stack(tmp_path, "--facts", str(facts), "--json", "--allow-unschedulable")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["summary"] == {"add": 0, "change": 0, "destroy": 0}


def test_plan_names_a_missing_facts_file(tmp_path: Path) -> None:
    (tmp_path / "stack.toml").write_text('[stack]\nname = "lab"\n')
    run = _stack(tmp_path, "--facts", "nope.json")
    assert run.returncode == 1
    assert run.stderr.splitlines() == ["error: `--facts nope.json` does not exist",
                                       "hint: write one with `stack facts --out FILE`."]


def test_agent_built_from_other_sources_is_an_update_in_the_plan(tmp_path: Path) -> None:
    """A code change without a version bump is still an agent upgrade: plan and apply
    compare the same bundle version (`0.1.0+<source hash>`)."""
    (tmp_path / "stack.toml").write_text('[stack]\nname = "lab"\n')
    facts = json.loads(_facts(tmp_path).read_text())
    facts["nodes"]["gpu-01"]["agent"]["version"] = "0.1.0+0000000000000000"
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    out = _stack(tmp_path, "--facts", str(tmp_path / "facts.json"), "--json")
    assert out.returncode == 0, out.stderr
    changes = {c["address"]: c for c in json.loads(out.stdout)["changes"]}
    assert changes["node.gpu-01.agent"]["action"] == "update"
    assert changes["node.gpu-01.agent"]["reason"] == (
        f"agent 0.1.0+0000000000000000 -> {bundle_version()}")
    assert "node.gpu-02.agent" not in changes


def test_a_pin_to_a_host_the_inventory_file_does_not_have_is_named_with_a_hint(
        tmp_path: Path) -> None:
    (tmp_path / "inventory.py").write_text('hosts = ["gpu-01", "gpu-02"]\n')
    (tmp_path / "stack.toml").write_text(
        '[stack]\nname = "lab"\ninventory = "inventory.py"\n\n'
        '[models.qwen]\nsource = "local://models/qwen"\npin = { node = "gpu-03" }\n')
    done = _stack(tmp_path, "--facts", str(_facts(tmp_path)))
    assert done.returncode == 1, done.stdout
    assert done.stderr.splitlines() == [
        "error: `models.qwen.pin.node` names `gpu-03`, which is not a host of the inventory "
        "file `inventory.py` (stack.toml:7:16)",
        "hint: did you mean `gpu-02`?"]


# the same stack with qwen from the hub (nothing cached, hub unreachable) and no broken model
HF_STACK = STACK.replace("local://models/qwen", "hf://Qwen/Qwen2.5-7B-Instruct").split(
    "\n[models.broken]")[0]


def test_a_model_whose_metadata_cannot_be_read_keeps_its_running_replica(
        tmp_path: Path) -> None:
    """Hub unreachable, nothing cached: the ready replica stays where it runs (no delete,
    no replace), the plan says why as a warning, and the replica that does not run yet
    cannot be placed (exit 1)."""
    (tmp_path / "stack.toml").write_text(HF_STACK)
    data = json.loads(_facts(tmp_path).read_text())
    data["nodes"]["gpu-01"]["agent"]["instances"] = [{
        "id": "qwen-0", "model": "qwen", "replica": 0, "gpus": [0], "port": 40001,
        "backend": "vllm", "backend_version": "0.11.0", "state": "ready", "kind": "llm",
        "spec_hash": "0123456789abcdef"}]
    (tmp_path / "facts.json").write_text(json.dumps(data))
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = _stack(tmp_path, "--facts", "facts.json", "--json", env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    plan = json.loads(run.stdout)
    addresses = [c["address"] for c in plan["changes"]]
    assert not [a for a in addresses if a.startswith("model.qwen")], addresses
    assert [(p["model"], p["replica"], p["node"], p["gpus"]) for p in plan["kept"]] == [
        ("qwen", 0, "gpu-01", [0])]
    assert plan["warnings"] == [
        "model.qwen: metadata unknown (`hf://Qwen/Qwen2.5-7B-Instruct` is not in the Hugging "
        "Face cache and the hub cannot be reached); running replicas kept"]
    assert [(u["model"], u["replica"]) for u in plan["unschedulable"]] == [("qwen", 1)]
    assert plan["unschedulable"][0]["reasons"][0].startswith("metadata unknown: ")

    text = _stack(tmp_path, "--facts", "facts.json", "--allow-unschedulable",
                  "--detailed-exitcode", env=env)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "  ! warning: model.qwen: metadata unknown (" in text.stdout


def test_plan_warns_when_git_tracks_the_stack_secret(tmp_path: Path) -> None:
    (tmp_path / "stack.toml").write_text('[stack]\nname = "lab"\n')
    facts = _facts(tmp_path)
    (tmp_path / ".stack").mkdir()
    (tmp_path / ".stack" / "secret").write_bytes(b"x" * 32)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    quiet = _stack(tmp_path, "--facts", str(facts))
    assert quiet.returncode == 0 and "warning:" not in quiet.stderr  # untracked: no warning
    subprocess.run([*git, "add", "-f", ".stack/secret"], check=True)
    loud = _stack(tmp_path, "--facts", str(facts))
    assert loud.returncode == 0
    assert loud.stderr.splitlines()[:2] == [
        "warning: `.stack/secret` is tracked by git: anyone who can read the repository can "
        "derive every backend key and agent token of this stack",
        "hint: run `git rm --cached .stack/secret`, add `.stack/` to .gitignore, then make a "
        "new secret (delete the file; the next apply rolls new keys out) and keep the old one "
        "out of the history."]


def test_plan_exits_1_naming_a_host_where_another_stack_has_the_agent_port(
        tmp_path: Path) -> None:
    """Also with `--detailed-exitcode`: the host is refused, not a change (exit 1)."""
    (tmp_path / "stack.toml").write_text('[stack]\nname = "staging"\n')
    facts = json.loads(_facts(tmp_path).read_text())
    facts["nodes"]["gpu-01"]["stacks"] = [
        {"name": "prod", "prefix": "/opt/prod", "agent_port": 7070}]
    (tmp_path / "facts.json").write_text(json.dumps(facts))

    run = _stack(tmp_path, "--facts", "facts.json", "--detailed-exitcode")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "  ! gpu-01: stack `prod` already uses agent port 7070 (prefix /opt/prod)" \
        in run.stdout.splitlines()
    assert run.stderr.splitlines() == [
        "error: 1 host(s) hold another stack that collides with this one: `gpu-01` "
        "(reasons above)",
        'hint: give this stack its own `agent_port` and `prefix` on those hosts '
        '(`[nodes."PATTERN"]`), or `stack destroy` the other stack first.']
    saved = _stack(tmp_path, "--facts", "facts.json", "--json")
    assert saved.returncode == 1
    assert [c["node"] for c in json.loads(saved.stdout)["conflicts"]] == ["gpu-01"]
