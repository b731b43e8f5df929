"""A host whose `python3` is too old for the agent is refused by name, in the plan and in
apply, and the rest of the fleet is served.

A loopback fleet of two hosts; node-02's `python3` (its `bin/`, first on the PATH its SSH
sessions get) is CPython 3.10 (pyenv's, on this machine image). Its facts say so; the plan
shows its agent as blocked with the hint and places nothing there; apply installs
node-01, serves the model through the router there, and fails node-02 with the plan's
sentence; nothing is written under node-02's prefix; a second plan shows only the block.

About 60 s on 2 cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet, gemma_stack_toml, run_stack, stack_session

from stack.bundle_target import AGENT_HINT
from stack.secrets import generate_key, hash_key

pytestmark = pytest.mark.integration

BLOCKED = ("node.node-02.agent will be updated in place (blocked: no agent can be installed: "
           "its python3 is 3.10; the agent needs 3.11 or newer)")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[dict[str, Any]]:
    old = sorted(Path.home().glob(".pyenv/versions/3.10.*/bin/python3.10"))
    if not old:
        pytest.skip("no CPython 3.10 here")
    work = tmp_path_factory.mktemp("oldpy")
    fleet = Fleet(2, root=work / "fleet")
    fleet.start()
    (fleet.hosts["node-02"].bin / "python3").symlink_to(old[0])  # first on its PATH
    key = generate_key()
    text, url = gemma_stack_toml(fleet, "oldpy", gguf_model, None, hash_key(key))
    (work / "stack.toml").write_text(text)
    with stack_session(fleet, work, "old-python-secret-0123456789abcdef"):
        yield {"fleet": fleet, "dir": work, "key": key, "url": url}


def test_the_plan_blocks_the_agent_and_places_nothing_there(world: dict[str, Any]) -> None:
    plan = run_stack("plan", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert BLOCKED in plan.stdout, plan.stdout
    assert f"hint: {AGENT_HINT}" in plan.stdout
    assert "node.node-01.agent will be created" in plan.stdout
    assert "node:    node-02" not in plan.stdout and "node.node-02.runtime" not in plan.stdout


def test_apply_serves_the_rest_and_names_the_host(world: dict[str, Any]) -> None:
    result = run_stack("apply", "--auto-approve", cwd=world["dir"])
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert ("no agent can be installed on `node-02`: its python3 is 3.10; the agent needs "
            "3.11 or newer") in out
    assert not (world["fleet"].hosts["node-02"].prefix / "agent").exists()

    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=60)
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert reply.choices[0].message.content


def test_a_second_plan_shows_only_the_block(world: dict[str, Any]) -> None:
    plan = run_stack("plan", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert BLOCKED in plan.stdout, plan.stdout
    assert "Plan: 0 to add, 1 to change, 0 to destroy." in plan.stdout, plan.stdout
