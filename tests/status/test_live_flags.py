"""Bad values of `stack status --watch` and `stack logs` flags: one sentence naming the
flag, then a hint, exit code 1 (checked before any host is contacted)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

STACK = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "stack"


@pytest.mark.parametrize(("args", "flag"), [
    (["status", "--watch", "--interval", "0"], "`--interval` must be at least 1 second"),
    (["status", "--watch", "--interval", "nan"], "`--interval` must be at least 1 second"),
    (["status", "--watch", "--count", "0"], "`--count` must be at least 1"),
    (["status", "--watch", "--json"], "`--watch` and `--json` cannot be combined"),
    (["logs", "gemma", "--since", "10x"], "`--since` must be a duration like `30s`"),
    (["logs", "gemma", "--since=-5m"], "`--since` must be a duration like `30s`"),
    (["logs", "gemma", "--replica", "-1"], "`--replica` cannot be negative"),
    (["logs", "gemma", "--tail", "-1"], "`--tail` cannot be negative"),
])
def test_a_bad_flag_is_named_with_a_hint(tmp_path: Path, args: list[str], flag: str) -> None:
    result = subprocess.run([str(STACK), *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    first, second = result.stderr.strip().splitlines()[-2:]
    assert first.startswith(f"error: {flag}") and second.startswith("hint: "), result.stderr


def test_logs_takes_f_for_follow_and_the_stack_file_as_file_only(tmp_path: Path) -> None:
    result = subprocess.run([str(STACK), "logs", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert "-f, --follow" in result.stdout and "--file FILE" in result.stdout
    assert "-f FILE" not in result.stdout
