"""Bad input to `stack apply`: each named with the host, key or flag and a hint."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from fleet import Fleet

ROOT = Path(__file__).resolve().parents[2]
STACK = str(ROOT / ".venv" / "bin" / "stack")


def stack(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STACK, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200",
                               "STACK_SECRET": "bad-input-test-secret-0123456789"})


def test_without_a_terminal_apply_needs_auto_approve_or_a_plan(tmp_path: Path) -> None:
    (tmp_path / "stack.toml").write_text('[hosts.a]\naddress = "127.0.0.1"\n')
    result = stack("apply", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: `stack apply` asks for confirmation, but there is no terminal",
        "hint: pass `--auto-approve`, or apply a saved plan: `stack plan --out PLAN` then "
        "`stack apply PLAN`.",
    ]


def test_a_stale_saved_plan_is_refused_with_a_hint_to_replan(tmp_path: Path) -> None:
    with Fleet(1, root=tmp_path / "fleet") as fleet:
        (tmp_path / "stack.toml").write_text(fleet.inventory_toml())
        made = stack("plan", "--out", "plan.json", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        (tmp_path / "stack.toml").write_text(fleet.inventory_toml() + "\n# edited\n")
        result = stack("apply", "plan.json", cwd=tmp_path)
        assert result.returncode == 1
        assert "error: the plan `plan.json` was made from another version of stack.toml" \
            in result.stderr
        assert "hint: make a new plan: `stack plan --out PLAN`" in result.stderr
        assert not (tmp_path / ".stack" / "lock").exists()


def test_a_refused_key_and_an_unreachable_host_are_named_and_nothing_else_stops(
        tmp_path: Path) -> None:
    with Fleet(2, root=tmp_path / "fleet") as fleet:
        other_key = tmp_path / "other_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)],
                       check=True)
        text = fleet.inventory_toml().replace(str(fleet.client_key), str(other_key), 1)
        fleet.stop_host("node-02")
        (tmp_path / "stack.toml").write_text(text)
        result = stack("apply", "--auto-approve", "--json", cwd=tmp_path)
        assert result.returncode == 1
        body = json.loads(result.stdout)
        first, second = body["hosts"]["node-01"], body["hosts"]["node-02"]
        assert "refused the SSH key" in first["error"] and "ssh_key" in first["hint"]
        assert "is unreachable" in second["error"] and "node-02" in second["hint"]
