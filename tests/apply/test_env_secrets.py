"""`env` values from the controller's environment, applied over real SSH to a loopback
host with the real llama.cpp model:

- the backend process gets the node's and the model's values (`/proc/PID/environ`);
- the file on the host that holds them (assignment.json) has mode 0600;
- no value appears in `stack plan` (text, `--json`, `--out`), the output of `stack apply`,
  `stack status` (text and `--json`), `stack logs` or the agent's log;
- a new value shows as a replaced replica; an unset variable is a located error.

About 60 s on 2 cores (the agent venv install and the model load).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import (  # tests/ is on sys.path (tests/conftest.py)
    Fleet,
    gemma_stack_toml,
    llama_sdist,
    run_stack,
    stack_session,
)

from stack.secrets import generate_key, hash_key

pytestmark = pytest.mark.integration

NODE_VAR, MODEL_VAR = "STACK_TEST_SECRET", "STACK_TEST_MODEL_SECRET"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, llama_bin: Path,
          gguf_model: Path) -> Iterator[dict[str, Any]]:
    llama_sdist(llama_bin.parent.parent.parent)  # so apply uploads scripts/setup-llama-cpp's build
    work = tmp_path_factory.mktemp("env")
    fleet = Fleet(1, root=work / "fleet")
    fleet.start()
    text, _ = gemma_stack_toml(fleet, "envtest", gguf_model, None, hash_key(generate_key()))
    text = text.replace("cpu_inference = true\n", "cpu_inference = true\nenv = { HF_TOKEN = "
                        f'{{ from_env = "{NODE_VAR}" }}, HF_HUB_OFFLINE = "1" }}\n', 1)
    text = text.replace('args = ["-t", "1"]\n', 'args = ["-t", "1"]\nenv = { MODEL_SECRET = '
                        f'{{ from_env = "{MODEL_VAR}" }}, HF_HUB_OFFLINE = "0" }}\n', 1)
    (work / "stack.toml").write_text(text)
    values = {NODE_VAR: "hf_node_" + secrets.token_hex(12),
              MODEL_VAR: "model-" + secrets.token_hex(12)}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        with stack_session(fleet, work, "env-test-secret-0123456789abcdef"):
            yield {"fleet": fleet, "dir": work, "values": values}


def _no_value(world: dict[str, Any], *texts: str) -> None:
    for text in texts:
        for value in world["values"].values():
            assert value not in text


def _backend_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_1_plan_names_the_variables_and_holds_no_value(world: dict[str, Any]) -> None:
    plan = run_stack("plan", "--out", "plan.json", cwd=world["dir"])
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert ("env:     HF_HUB_OFFLINE, HF_TOKEN (from the controller's environment), "
            "MODEL_SECRET (from the controller's environment)") in plan.stdout
    as_json = run_stack("plan", "--json", cwd=world["dir"])
    assert as_json.returncode == 0, as_json.stderr
    saved = (world["dir"] / "plan.json").read_text()
    assert '"from_env": "STACK_TEST_SECRET"' in saved
    _no_value(world, plan.stdout, plan.stderr, as_json.stdout, as_json.stderr, saved)


def _apply_saved(world: dict[str, Any], plan: str) -> Any:
    """`stack apply PLAN` of a plan made just before: other tests on this machine may
    record their stacks in the same home folder, which makes a saved plan stale."""
    for _ in range(3):
        made = run_stack("plan", "--out", plan, cwd=world["dir"])
        assert made.returncode in (0, 2), made.stdout + made.stderr
        result = run_stack("apply", "--auto-approve", plan, cwd=world["dir"])
        if "the fleet changed since the plan" not in result.stderr:
            break
    return result


def test_2_apply_gives_the_backend_the_values_in_a_private_file(world: dict[str, Any]) -> None:
    result = _apply_saved(world, "plan.json")
    assert result.returncode == 0, result.stdout + result.stderr
    _no_value(world, result.stdout, result.stderr)
    prefix = world["fleet"].hosts["node-01"].prefix
    assignment = prefix / "state" / "assignment.json"
    assert oct(assignment.stat().st_mode & 0o777) == "0o600"
    assert world["values"][NODE_VAR] in assignment.read_text()
    status = run_stack("status", "--json", cwd=world["dir"])
    assert status.returncode == 0, status.stderr
    [inst] = json.loads(status.stdout)["nodes"]["node-01"]["instances"]
    assert inst["state"] == "ready", inst
    # the agent's record of the backend process it started (mode 0600, like the others)
    record = json.loads((prefix / "state" / "instances" / f"{inst['id']}.json").read_text())
    env = _backend_environ(record["pid"])
    assert env["HF_TOKEN"] == world["values"][NODE_VAR]  # the node's
    assert env["MODEL_SECRET"] == world["values"][MODEL_VAR]  # the model's
    assert env["HF_HUB_OFFLINE"] == "0"  # the model's wins over the node's
    shown = run_stack("status", cwd=world["dir"])
    logs = run_stack("logs", "gemma", "--tail", "200", cwd=world["dir"])
    assert logs.returncode == 0 and logs.stdout.strip(), logs.stderr
    agent_log = (prefix / "logs" / "agent.log").read_text()
    _no_value(world, status.stdout, status.stderr, shown.stdout, shown.stderr, logs.stdout,
              logs.stderr, agent_log)
    # the instance the agent runs (values filled in) has the plan's fingerprint (digests):
    # nothing to replace (the agent may show as an update when this checkout's code changed)
    clean = run_stack("plan", cwd=world["dir"])
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "model.gemma" not in clean.stdout


def test_3_a_new_value_replaces_the_replica_and_an_unset_one_is_an_error(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    old = os.environ[NODE_VAR]
    new = "hf_rotated_" + secrets.token_hex(12)
    monkeypatch.setenv(NODE_VAR, new)
    plan = run_stack("plan", "--detailed-exitcode", "--out", "rotated.json", cwd=world["dir"])
    assert plan.returncode == 2, plan.stdout + plan.stderr
    assert "model.gemma.replica[0] must be replaced (args or env changed)" in plan.stdout
    saved = (world["dir"] / "rotated.json").read_text()
    _no_value({"values": {"old": old, "new": new}}, plan.stdout, plan.stderr, saved)
    # the value changes again between plan and apply: apply refuses, naming only the name
    third = "hf_third_" + secrets.token_hex(12)
    monkeypatch.setenv(NODE_VAR, third)
    stale = run_stack("apply", "--auto-approve", "rotated.json", cwd=world["dir"])
    assert stale.returncode == 1
    output = stale.stdout + stale.stderr
    assert f"`{NODE_VAR}` holds another value than when the plan was made" in output
    _no_value({"values": {"old": old, "new": new, "third": third}}, output)
    monkeypatch.delenv(NODE_VAR)
    missing = run_stack("plan", cwd=world["dir"])
    assert missing.returncode == 1
    assert (f"`nodes.\"*\".env.HF_TOKEN` takes its value from `{NODE_VAR}`, which is not set "
            "in the controller's environment (stack.toml:") in missing.stderr
    assert f"hint: `export {NODE_VAR}=...`" in missing.stderr
