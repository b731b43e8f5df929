"""Runtime versions side by side on a loopback host, over real SSH, in order:

1. `[runtimes."llama.cpp"]` lists versions A and B, the model pins A: apply installs A
   (only what an instance needs is installed) and the instance runs from A's folder;
2. the model pins B: the plan replaces the replica (new version A -> B), creates B and
   deletes nothing while A is still listed; apply runs the instance from B, A stays beside
   it, and a chat completion through the router works;
3. A leaves `versions`: the plan deletes `node.node-01.runtime.llama.cpp@A` and nothing
   else; apply removes A's folder, keeps B, leaves the instance alone (same pid); the plan
   is clean after;
4. the model moves to a version C whose server never becomes ready while B leaves
   `versions` in the same apply: apply fails on the host and B is not removed; pinned back
   to B (listed again), the host converges;
5. B's recipe changes (its `path`): the plan installs B again (a replace, with the old and
   new recipe digests) and restarts the replica that runs from it; apply does both, and
   the plan is clean after.

Both runtimes are `source = "system"` with `path = ".../{version}"`: each version's
folder links to the `llama_bin` fixture (cheap to install), so the instance's command line
names the version it runs from. The model is an absolute host path (no upload). The removal rule
itself is tested first without hosts (`unused_versions`, `remove_unused_runtimes`). About
70-100 s on 2 cores (the agent venv install, three llama-server starts).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import (  # tests/ is on sys.path (tests/conftest.py)
    Fleet,
    router_endpoint,
    run_stack,
    stack_session,
    system_runtimes,
)

from agent.assignment import Assignment, Instance
from deploys.runtimes import unused_versions
from stack import remote
from stack.apply.desired import Desired
from stack.apply.hosts import Node as _Node
from stack.apply.report import HostReport
from stack.apply.runtimes import remove_unused_runtimes
from stack.config import load_text
from stack.secrets import generate_key, hash_key
from stack.snapshot import NodeFacts

A, B, C = "b6500", "b6700", "b6800"
RUNTIMES = "runtimes/llama.cpp"


def stack_toml(world: dict[str, Any], versions: list[str], pinned: str,
               system: Path | None = None) -> str:
    return f'''[stack]
name = "rtversions"
port_range = [{world["low"]}, {world["low"] + 40}]

{world["fleet"].inventory_toml()}
[nodes."*"]
cpu_inference = true

[runtimes."llama.cpp"]
source = "system"
path = "{system or world["system"]}/{{version}}"
versions = {json.dumps(versions)}

[models.gemma]
source = "{world["model"]}"
backend = "llama.cpp"
backend_version = "{pinned}"
context = 1024
args = ["-t", "1"]

[router]
hosts = ["node-01"]
listen = "{world["listen"]}"

[[keys]]
name = "test"
hash = "{world["key_hash"]}"
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("rtversions")
    system = system_runtimes(work / "system", llama_bin, (A, B))
    broken = system / C  # a server that exits at once: never ready
    broken.mkdir()
    (broken / "llama-server").write_text("#!/bin/sh\necho 'no such model' >&2\nexit 1\n")
    (broken / "llama-server").chmod(0o755)
    fleet = Fleet(1, root=work / "fleet")
    fleet.start()
    key = generate_key()
    listen, url = router_endpoint(fleet, "node-01")
    world = {"fleet": fleet, "dir": work, "key": key, "key_hash": hash_key(key),
             "system": system, "llama_bin": llama_bin, "model": gguf_model,
             "low": random.randint(41000, 59000),
             "listen": listen, "url": url, "prefix": fleet.hosts["node-01"].prefix}
    with stack_session(fleet, work, "rtversions-test-secret-0123456789abcdef"):
        yield world


def write(world: dict[str, Any], versions: list[str], pinned: str,
          system: Path | None = None) -> None:
    (world["dir"] / "stack.toml").write_text(stack_toml(world, versions, pinned, system))


def plan_changes(world: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The plan's changes by address, but an agent update: the agent's version hashes this
    checkout's sources, which may change while the test runs (the tree is shared)."""
    result = run_stack("plan", "--json", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    return {c["address"]: c for c in json.loads(result.stdout)["changes"]
            if c["address"] != "node.node-01.agent"}


def assert_clean(world: dict[str, Any]) -> None:
    """`stack plan --detailed-exitcode` exits 0 (or 2 for an agent update alone: see
    `plan_changes`)."""
    plan = run_stack("plan", "--detailed-exitcode", cwd=world["dir"])
    assert plan.returncode in (0, 2), plan.stdout + plan.stderr
    if plan.returncode == 2:
        assert plan_changes(world) == {}, plan.stdout


def apply(world: dict[str, Any], *extra: str) -> str:
    result = run_stack("apply", "--auto-approve", *extra, cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    return str(result.stdout)


def gemma(world: dict[str, Any]) -> tuple[int, str]:
    """The one llama-server on the host (ready): its pid and the binary it was started as."""
    status = run_stack("status", "--json", cwd=world["dir"])
    assert status.returncode == 0, status.stderr
    [inst] = json.loads(status.stdout)["nodes"]["node-01"]["instances"]
    assert inst["state"] == "ready", inst
    servers = {pid: cmd for pid, cmd in world["fleet"].stack_processes().items()
               if "llama-server" in cmd.split(" ", 1)[0]}
    [(pid, cmd)] = servers.items()
    return pid, cmd.split(" ", 1)[0]


def installed(world: dict[str, Any], version: str) -> bool:
    folder: Path = world["prefix"] / RUNTIMES / version
    return (folder / ".installed").is_file() and (folder / "bin" / "llama-server").exists()


@pytest.mark.integration
def test_1_the_pinned_version_is_installed_and_runs(world: dict[str, Any]) -> None:
    write(world, [A, B], A)
    changes = plan_changes(world)
    assert changes["node.node-01.runtime.llama.cpp@b6500"]["action"] == "create"
    assert "node.node-01.runtime.llama.cpp@b6700" not in changes  # nothing needs B yet
    out = apply(world)
    assert "runtime llama.cpp b6500" in out
    assert installed(world, A)
    assert not (world["prefix"] / RUNTIMES / B).exists()
    _, binary = gemma(world)
    assert binary == f"{world['prefix']}/{RUNTIMES}/{A}/bin/llama-server"


@pytest.mark.integration
def test_2_switching_versions_replaces_the_replica_and_keeps_the_listed_one(
        world: dict[str, Any]) -> None:
    write(world, [A, B], B)
    changes = plan_changes(world)
    replica = changes["model.gemma.replica[0]"]
    assert replica["action"] == "replace"
    assert replica["reason"] == f"new version {A} -> {B}"
    assert changes[f"node.node-01.runtime.llama.cpp@{B}"]["action"] == "create"
    assert not [c for c in changes.values() if c["action"] == "delete"], changes
    out = apply(world)
    assert "node-01: gemma-0 is ready" in out
    assert "removed" not in out
    assert installed(world, A) and installed(world, B)  # side by side
    _, binary = gemma(world)
    assert binary == f"{world['prefix']}/{RUNTIMES}/{B}/bin/llama-server"

    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=60)
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


@pytest.mark.integration
def test_3_an_unlisted_version_is_removed_and_the_instance_is_untouched(
        world: dict[str, Any]) -> None:
    pid, _ = gemma(world)
    write(world, [B], B)
    changes = plan_changes(world)
    assert list(changes) == [f"node.node-01.runtime.llama.cpp@{A}"], changes
    delete = changes[f"node.node-01.runtime.llama.cpp@{A}"]
    assert delete["action"] == "delete"
    assert delete["reason"] == f"`runtimes.llama.cpp.versions` no longer lists {A}"
    out = apply(world)
    assert f"removed llama.cpp {A}" in out
    assert not (world["prefix"] / RUNTIMES / A).exists()
    assert installed(world, B)
    assert (world["system"] / A / "llama-server").exists()  # the link went, not its target
    assert gemma(world) == (pid, f"{world['prefix']}/{RUNTIMES}/{B}/bin/llama-server")
    assert_clean(world)


@pytest.mark.integration
def test_4_a_version_is_kept_while_its_replacement_is_not_ready(world: dict[str, Any]) -> None:
    write(world, [C], C)  # B unlisted in the same apply that moves the replica off it
    changes = plan_changes(world)
    assert changes[f"node.node-01.runtime.llama.cpp@{B}"]["action"] == "delete"
    result = run_stack("apply", "--auto-approve", "--ready-timeout", "8", cwd=world["dir"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "✗ node-01: `node-01`: not ready after 8 s: gemma-0 (" in result.stdout
    assert "removed" not in result.stdout
    assert installed(world, B) and installed(world, C)
    # back to B: the host converges and C, no longer listed nor used, goes
    write(world, [B], B)
    out = apply(world)
    assert f"removed llama.cpp {C}" in out
    assert installed(world, B) and not (world["prefix"] / RUNTIMES / C).exists()
    _, binary = gemma(world)
    assert binary == f"{world['prefix']}/{RUNTIMES}/{B}/bin/llama-server"
    assert_clean(world)


@pytest.mark.integration
def test_5_a_changed_recipe_installs_the_version_again_and_restarts_its_replica(
        world: dict[str, Any]) -> None:
    pid, _ = gemma(world)
    moved = system_runtimes(world["dir"] / "system-moved", world["llama_bin"], (B,))
    write(world, [B], B, system=moved)
    changes = plan_changes(world)
    runtime = f"node.node-01.runtime.llama.cpp@{B}"
    assert set(changes) == {runtime, "model.gemma.replica[0]"}, changes
    assert changes[runtime]["action"] == "replace"
    assert "its recipe changed" in changes[runtime]["reason"]
    assert changes["model.gemma.replica[0]"]["reason"] == \
        "its runtime is installed again (recipe changed)"
    apply(world)
    assert os.readlink(world["prefix"] / RUNTIMES / B / "bin") == str(moved / B)
    new_pid, binary = gemma(world)
    assert new_pid != pid and binary == f"{world['prefix']}/{RUNTIMES}/{B}/bin/llama-server"
    assert_clean(world)


# -- the rule, without hosts -------------------------------------------------------------


def test_only_unlisted_versions_that_no_instance_uses_are_unused() -> None:
    installed = {"llama.cpp": ["b1", "b2", "b3"], "vllm": ["0.10.2"], "llama-old": ["o1"]}
    listed = {"llama.cpp": ["b2"], "vllm": ["0.10.2", "0.11.0"]}
    in_use = {("llama.cpp", "b3")}
    # b2 listed, b3 used, vllm listed; llama-old no longer named at all
    assert unused_versions(installed, listed, in_use) == {"llama.cpp": ["b1"],
                                                          "llama-old": ["o1"]}
    assert unused_versions(installed, {**listed, "llama-old": ["o1"]},
                           {("llama.cpp", "b1"), ("llama.cpp", "b3")}) == {}


PREFIX = "/opt/stack"
SPEC = load_text('''[stack]
name = "lab"

[runtimes."llama.cpp"]
source = "system"
path = "/opt/llama/{version}"
versions = ["b2"]
''', "stack.toml")


def _inst(iid: str, version: str) -> Instance:
    return Instance(id=iid, model="gemma", source="/m.gguf", backend="llama.cpp",
                    backend_version=version, port=40000,
                    runtime_path=f"{PREFIX}/runtimes/llama.cpp/{version}")


def _removals(monkeypatch: pytest.MonkeyPatch, nodes: list[_Node], desired: Desired,
              reports: dict[str, HostReport], ok: bool = True) -> list[tuple[str, str]]:
    ran: list[tuple[str, str]] = []

    def run(host: Any, command: str) -> tuple[bool, str, str]:
        ran.append((host, command))
        return ok, "", "" if ok else "rm: cannot remove: Permission denied"

    monkeypatch.setattr(remote, "run", run)
    remove_unused_runtimes(SPEC, nodes, desired, reports)
    return ran


def test_a_version_the_agent_was_last_told_to_run_is_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """b1 is unlisted, but the assignment on the host (an old instance held beside its
    replacement) still names it: not removed; b0 is unlisted and unused: removed."""
    facts = NodeFacts(runtimes={"llama.cpp": ["b0", "b1", "b2"]})
    node = _Node("gpu-01", "gpu-01", PREFIX, facts,
                 current=Assignment(node="gpu-01", instances=[_inst("old-0", "b1")]))
    desired = Desired({"gpu-01": Assignment(node="gpu-01", instances=[_inst("gemma-0", "b2")])},
                      None, [])
    reports = {"gpu-01": HostReport("gpu-01")}
    ran = _removals(monkeypatch, [node], desired, reports)
    assert ran == [("gpu-01", f"rm -rf {PREFIX}/runtimes/llama.cpp/b0\n")]
    assert reports["gpu-01"].changed == ["removed llama.cpp b0"]


def test_nothing_is_removed_on_a_host_whose_instances_did_not_converge(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed host (its new instance never became ready, or it was unreachable when
    apply started and never joined) may still run an unlisted version: left alone."""
    facts = NodeFacts(runtimes={"llama.cpp": ["b1", "b2"]})
    failed = _Node("gpu-01", "gpu-01", PREFIX, facts)
    desired = Desired({"gpu-01": Assignment(node="gpu-01", instances=[_inst("gemma-0", "b2")])},
                      None, [])
    reports = {"gpu-01": HostReport("gpu-01")}
    reports["gpu-01"].fail("`gpu-01`: not ready after 8 s: gemma-0 (crash-looping)")
    assert _removals(monkeypatch, [failed], desired, reports) == []
    assert reports["gpu-01"].changed == []


def test_a_failed_removal_is_reported_on_its_host(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _Node("gpu-01", "gpu-01", PREFIX, NodeFacts(runtimes={"llama.cpp": ["b1", "b2"]}))
    reports = {"gpu-01": HostReport("gpu-01")}
    _removals(monkeypatch, [node], Desired({}, None, []), reports, ok=False)
    assert reports["gpu-01"].error == ("`gpu-01`: could not remove llama.cpp b1: "
                                       "rm: cannot remove: Permission denied")
