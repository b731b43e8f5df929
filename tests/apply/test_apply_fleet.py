"""`stack apply` over real SSH on a loopback fleet of two hosts, in order:

1. apply installs the agent (wheel + wheelhouse, no index), the llama.cpp runtime (the
   controller's prebuilt `bin/` for the same sdist, args and platform), uploads the model,
   starts the router; a chat completion through the router with the `openai` client;
2. a second apply changes nothing and `stack plan --detailed-exitcode` exits 0;
3. a changed model setting replaces the instance and the plan is clean again;
4. with one host stopped, apply exits 1 naming it while the other converges;
5. `stack status --json` and `stack logs`; `stack destroy` stops every process.

About 60-90 s on 2 cores (mostly the agent venv install on two hosts and the model load).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import (  # tests/ is on sys.path (tests/conftest.py)
    LLAMA_SDIST_VERSION,
    Fleet,
    gemma_stack_toml,
    llama_sdist,
    run_stack,
    stack_session,
)

from stack.secrets import generate_key, hash_key
from stack.wheelhouse import bundle_version, controller_target

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[dict[str, Any]]:
    cache = llama_bin.parent.parent.parent  # ~/.cache/modelstack (setup-llama-cpp's cache)
    llama_sdist(cache)  # what scripts/setup-llama-cpp built, so apply uploads its build
    work = tmp_path_factory.mktemp("apply")
    fleet = Fleet(2, root=work / "fleet")
    fleet.start()
    key = generate_key()
    # no [runtimes] table: the catalogue's llama.cpp recipe, its CPU variant on these hosts
    text, url = gemma_stack_toml(fleet, "applytest", gguf_model, None, hash_key(key),
                                 router="node-01")
    (work / "stack.toml").write_text(text)
    with stack_session(fleet, work, "apply-test-secret-0123456789abcdef"):
        yield {"fleet": fleet, "dir": work, "key": key, "url": url}


def test_1_apply_installs_everything_and_serves_through_the_router(world: dict[str, Any]) -> None:
    result = run_stack("apply", "--auto-approve", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "node-01: runtime llama.cpp 0.3.36-cpu, agent-install" in result.stdout
    assert "Apply complete: 2 hosts converged." in result.stdout
    prefix = world["fleet"].hosts["node-01"].prefix
    runtime = prefix / "runtimes" / "llama.cpp" / f"{LLAMA_SDIST_VERSION}-cpu"
    assert (runtime / "bin" / "llama-server").exists()
    assert (runtime / ".installed").exists()
    # the fleet's python3 is this machine's system one: the controller's minor version
    assert (prefix / "agent" / ".installed").read_text().strip() == \
        bundle_version(target=controller_target())
    assert oct((prefix / "etc" / "agent.token").stat().st_mode & 0o777) == "0o600"
    assert oct((prefix / "etc" / "router.json").stat().st_mode & 0o777) == "0o600"

    from openai import OpenAI

    client = OpenAI(base_url=world["url"], api_key=world["key"], timeout=60)
    reply = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_2_second_apply_changes_nothing_and_plan_is_clean(world: dict[str, Any]) -> None:
    result = run_stack("apply", "--auto-approve", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "node-01: no changes" in result.stdout
    assert "node-02: no changes" in result.stdout
    assert result.stdout.rstrip().endswith("No changes. The fleet matches stack.toml.")
    plan = run_stack("plan", "--detailed-exitcode", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr


def test_3_a_changed_model_is_replaced_and_the_plan_is_clean_again(
        world: dict[str, Any]) -> None:
    path = world["dir"] / "stack.toml"
    path.write_text(path.read_text().replace("context = 1024", "context = 1536"))
    result = run_stack("apply", "--auto-approve", "--max-unavailable", "1", cwd=world["dir"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ node-01: assignment" in result.stdout
    assert "node-01: gemma-0 is ready" in result.stdout
    plan = run_stack("plan", "--detailed-exitcode", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr


def test_4_a_stopped_host_fails_by_name_while_the_other_converges(
        world: dict[str, Any]) -> None:
    fleet: Fleet = world["fleet"]
    fleet.stop_host("node-02")
    try:
        result = run_stack("apply", "--auto-approve", cwd=world["dir"])
        assert result.returncode == 1
        assert "✗ node-02: host `node-02`" in result.stdout
        assert "is unreachable" in result.stdout
        assert "✓ node-01:" in result.stdout
        assert "Apply failed on 1 of 2 hosts." in result.stdout
        # the lock was released: the next apply is not refused
        assert not (world["dir"] / ".stack" / "lock").exists()
    finally:
        fleet.start_host("node-02")
    again = run_stack("apply", "--auto-approve", cwd=world["dir"])
    assert again.returncode == 0, again.stdout + again.stderr


def test_5_status_logs_and_destroy(world: dict[str, Any]) -> None:
    status = run_stack("status", "--json", cwd=world["dir"])
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    [inst] = body["nodes"]["node-01"]["instances"]
    assert inst["id"] == "gemma-0" and inst["state"] == "ready"
    assert body["routers"]["node-01"]["up"] is True
    logs = run_stack("logs", "gemma", "--tail", "5", cwd=world["dir"])
    assert logs.returncode == 0 and logs.stdout.strip(), logs.stderr
    destroy = run_stack("destroy", "--auto-approve", cwd=world["dir"])
    assert destroy.returncode == 0, destroy.stdout + destroy.stderr
    prefix = world["fleet"].hosts["node-01"].prefix
    assert not (prefix / "run" / "agent.supervisor.pid").exists()
    assert not (prefix / "run" / "router.supervisor.pid").exists()
    assert world["fleet"].stack_processes() == {}
