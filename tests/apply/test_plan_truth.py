"""The plan is the truth: apply-then-change cases over a loopback fleet (one runner).

A stack (two hosts, Gemma on llama.cpp from a `local://` file, a router on node-01) is
applied once. Then each case in tests/apply/changes/ (in name order, each on the state the
previous one left) changes it, either through a `stack` command (`"stack": [...]`) or by
setting a parameter of the stack.toml below (`"set": {...}`), and proves:

- `stack plan --detailed-exitcode` exits 2 and shows exactly the `expect` addresses (and,
  where the case gives them, these `reasons`);
- `stack apply --auto-approve` (or, with `"saved": true`, `stack plan --out plan.json` then
  `stack apply plan.json`) makes the change, and the router still answers;
- the next `stack plan --detailed-exitcode` exits 0.

The runtime is `source = "system"` (each version a link to the `llama_bin` fixture), so
installing a version is cheap. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import random
import shutil
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

from stack.secrets import generate_key, hash_key

pytestmark = pytest.mark.integration

CASES = sorted((Path(__file__).parent / "changes").glob("*.json"))
VERSIONS = ("b6500", "b6700")
DEFAULTS: dict[str, Any] = {"retries": None, "agent": "", "args": ["-t", "1"],
                            "version": "b6500", "append": 0,
                            "zones": {"node-01": "a", "node-02": "b"}}


def stack_toml(world: dict[str, Any], params: dict[str, Any]) -> str:
    inventory = world["fleet"].inventory_toml()
    for node, zone in params["zones"].items():
        inventory = inventory.replace(f'[hosts."{node}"]\n',
                                      f'[hosts."{node}"]\nlabels = {{ zone = "{zone}" }}\n')
    retries = f"retries = {params['retries']}\n" if params["retries"] is not None else ""
    agent = f"\n[agent]\n{params['agent']}\n" if params["agent"] else ""
    return f'''[stack]
name = "truth"
port_range = [{world["low"]}, {world["low"] + 40}]

{inventory}
[nodes."*"]
cpu_inference = true

[runtimes."llama.cpp"]
source = "system"
path = "{world["system"]}/{{version}}"
versions = {json.dumps(list(VERSIONS))}

[models.gemma]
source = "local://model/gemma.gguf"
backend = "llama.cpp"
backend_version = "{params["version"]}"
context = 1024
args = {json.dumps(params["args"])}
selector = ["zone=a"]

[router]
hosts = ["node-01"]
listen = "{world["listen"]}"
{retries}{agent}{params.get("extra", "")}
[[keys]]
name = "test"
hash = "{world["key_hash"]}"
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("truth")
    system = system_runtimes(work / "system", llama_bin, VERSIONS)
    (work / "model").mkdir()
    shutil.copy(gguf_model, work / "model" / "gemma.gguf")  # a copy: case 07 appends to it
    fleet = Fleet(2, root=work / "fleet")
    fleet.start()
    key = generate_key()
    listen, url = router_endpoint(fleet, "node-01")
    world = {"fleet": fleet, "dir": work, "key": key, "key_hash": hash_key(key),
             "system": system, "low": random.randint(41000, 59000), "listen": listen,
             "url": url, "params": dict(DEFAULTS)}
    (work / "stack.toml").write_text(stack_toml(world, world["params"]))
    with stack_session(fleet, work, "truth-test-secret-0123456789abcdef"):
        done = run_stack("apply", "--auto-approve", cwd=work)
        assert done.returncode == 0, done.stdout + done.stderr
        assert_clean(world)
        yield world


def changes(world: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    """`stack plan --detailed-exitcode --json`: its exit code and changes (address ->
    reason), but an agent update (the agent's version hashes this checkout, which may
    change while the tests run)."""
    done = run_stack("plan", "--detailed-exitcode", "--json", cwd=world["dir"])
    assert done.returncode in (0, 2), done.stdout + done.stderr
    plan = json.loads(done.stdout)
    found = {c["address"]: c["reason"] for c in plan["changes"]
             if not (c["address"].startswith("node.") and c["address"].endswith(".agent"))}
    return done.returncode, found, done.stdout


def assert_clean(world: dict[str, Any]) -> None:
    _, found, text = changes(world)
    assert found == {}, text


def ask(world: dict[str, Any]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=60)
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def make_change(world: dict[str, Any], case: dict[str, Any]) -> None:
    if "stack" in case:
        done = run_stack(*case["stack"], cwd=world["dir"])
        assert done.returncode == 0, done.stdout + done.stderr
        return
    params = world["params"]
    before = params["append"]
    params.update(case["set"])
    if params["append"] != before:  # new content in the local:// model file
        with (world["dir"] / "model" / "gemma.gguf").open("ab") as handle:
            handle.write(b"\0" * (params["append"] - before))
    (world["dir"] / "stack.toml").write_text(stack_toml(world, params))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_change_shows_in_the_plan_and_apply_makes_exactly_it(
        world: dict[str, Any], path: Path) -> None:
    case = json.loads(path.read_text())
    make_change(world, case)
    code, found, text = changes(world)
    assert code == 2, text
    assert sorted(found) == sorted(case["expect"]), text
    for address, reason in case.get("reasons", {}).items():
        assert found[address] == reason, text
    if case.get("saved"):  # as CI does on merge: the reviewed plan, applied as it is
        saved = run_stack("plan", "--out", "plan.json", cwd=world["dir"])
        assert saved.returncode == 0, saved.stdout + saved.stderr
        done = run_stack("apply", "plan.json", cwd=world["dir"])
    else:
        done = run_stack("apply", "--auto-approve", cwd=world["dir"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert_clean(world)
    ask(world)


def test_a_replica_that_cannot_be_placed_fails_plan_and_apply_after_the_rest_converges(
        world: dict[str, Any]) -> None:
    params = world["params"]
    params["retries"] = 1  # a change apply makes while the second model cannot be placed
    params["extra"] = ('\n[models.nowhere]\nsource = "local://model/gemma.gguf"\n'
                       'backend = "llama.cpp"\nselector = ["zone=z"]\n')
    (world["dir"] / "stack.toml").write_text(stack_toml(world, params))
    plan = run_stack("plan", "--detailed-exitcode", cwd=world["dir"])
    assert plan.returncode == 1, plan.stdout + plan.stderr
    assert "  ! model.nowhere.replica[0]" in plan.stdout
    assert plan.stderr.startswith(
        "error: 1 replica(s) cannot be placed: `nowhere` replica 0 (reasons above)\n")
    done = run_stack("apply", "--auto-approve", cwd=world["dir"])
    assert done.returncode == 1, done.stdout + done.stderr
    assert "node-01: router" in done.stdout  # the rest converged first
    assert "error: 1 replica(s) cannot be placed: `nowhere` replica 0" in done.stdout
    again = run_stack("plan", "--detailed-exitcode", "--allow-unschedulable",
                      cwd=world["dir"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "No changes to make, but some replicas cannot be placed." in again.stdout
    ask(world)
