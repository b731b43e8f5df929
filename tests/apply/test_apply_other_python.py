"""A host whose `python3` is another minor version than the controller's gets a working agent.

On a loopback fleet of one host, `python3` on that host's PATH (its `bin/`, first on the
PATH its SSH sessions get) is a CPython of another minor version (pyenv's, on this machine
image). Its facts say so, the plan installs the agent built for it, apply downloads that
target's wheels (cached per machine under ~/.cache/modelstack/wheelhouse, like the
llama.cpp build), the agent runs from a venv of that Python, answers `/healthz` and serves
the test model through the router; a plan afterwards is empty.

About 60 s on 2 cores (the first run also downloads the target's wheels, about 18 MB).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import Fleet, gemma_stack_toml, run_stack, stack_session

from stack.bundle_target import BundleTarget
from stack.secrets import generate_key, hash_key
from stack.wheelhouse import bundle_version, controller_target

pytestmark = pytest.mark.integration


def other_python() -> Path | None:
    """A CPython 3.11+ of another minor version than this one (pyenv's first)."""
    for minor in (12, 13, 11, 14):
        if minor == sys.version_info.minor:
            continue
        for path in sorted(Path.home().glob(f".pyenv/versions/3.{minor}.*/bin/python3.{minor}")):
            return path
    return None


def minor_version(python: Path) -> str:
    """`3.12`: the major.minor version of that interpreter."""
    code = "import sys; print('%d.%d' % sys.version_info[:2])"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[dict[str, Any]]:
    python = other_python()
    if python is None:
        pytest.skip("no CPython 3.11+ of another minor version than the controller's here")
    work = tmp_path_factory.mktemp("otherpy")
    fleet = Fleet(1, root=work / "fleet")
    fleet.start()
    (fleet.hosts["node-01"].bin / "python3").symlink_to(python)  # first on its PATH
    key = generate_key()
    text, url = gemma_stack_toml(fleet, "otherpy", gguf_model, None, hash_key(key))
    (work / "stack.toml").write_text(text)
    version = minor_version(python)
    with stack_session(fleet, work, "other-python-secret-0123456789abcdef"):
        yield {"fleet": fleet, "dir": work, "key": key, "url": url, "python": version}


def test_the_facts_name_the_hosts_python_and_the_plan_its_own_agent(
        world: dict[str, Any]) -> None:
    facts = run_stack("facts", "--out", str(world["dir"] / "facts.json"), cwd=world["dir"])
    assert facts.returncode == 0, facts.stdout + facts.stderr
    node = json.loads((world["dir"] / "facts.json").read_text())["nodes"]["node-01"]
    assert node["python"] == world["python"] != controller_target().python
    here = controller_target()
    target = BundleTarget(world["python"], here.os, here.arch, here.libc)
    plan = run_stack("plan", cwd=world["dir"])
    assert f"install the agent {bundle_version(target=target)}" in plan.stdout, plan.stdout


def test_the_agent_installs_runs_and_serves_on_the_other_python(world: dict[str, Any]) -> None:
    result = run_stack("apply", "--auto-approve", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    prefix = world["fleet"].hosts["node-01"].prefix
    installed = (prefix / "agent" / ".installed").read_text().strip()
    assert installed.endswith(f"@py{world['python']}-linux-{controller_target().arch}"
                              f"-{controller_target().libc.replace(' ', '')}")
    assert minor_version(prefix / "agent" / "venv" / "bin" / "python") == world["python"]
    # hosts get what the agent and router import, none of the controller's dependencies
    site = next((prefix / "agent" / "venv" / "lib").glob("python3.*/site-packages"))
    installed_dists = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"pydantic", "fastapi", "uvicorn", "uvloop", "orjson"} <= installed_dists
    assert not installed_dists & {"pyinfra", "gevent", "numpy", "rich", "jinja2", "gguf"}

    listen = tomllib.loads((prefix / "etc" / "agent.toml").read_text())["listen"]
    with urllib.request.urlopen(f"http://{listen}/healthz", timeout=10) as reply:
        assert reply.status == 200

    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=60)
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert reply.choices[0].message.content


def test_a_plan_after_apply_is_empty(world: dict[str, Any]) -> None:
    plan = run_stack("plan", "--detailed-exitcode", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "No changes. The fleet matches stack.toml." in plan.stdout
