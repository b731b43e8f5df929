"""Bad values of `stack status --watch` and `stack logs` flags: one sentence naming the
flag, then a hint, exit code 1 (checked before any host is contacted)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stack.cli import build_parser
from stack.commands.logs import _check

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


@pytest.mark.parametrize(("argv", "model", "file", "follow"), [
    (["logs", "gemma"], "gemma", "stack.toml", False),
    (["logs", "gemma", "-f"], "gemma", "stack.toml", True),
    (["logs", "-f", "gemma"], "gemma", "stack.toml", True),
    (["logs", "gemma", "--follow", "--since", "10m"], "gemma", "stack.toml", True),
    (["logs", "-f", "gemma", "--since", "10m"], "gemma", "stack.toml", True),
    # as on every command: `-f FILE` before the model, `--file FILE` anywhere
    (["logs", "-f", "prod/stack.toml", "gemma"], "gemma", "prod/stack.toml", False),
    (["logs", "-f", "prod/stack.toml", "gemma", "--follow"], "gemma", "prod/stack.toml", True),
    (["logs", "--file", "prod/stack.toml", "gemma", "-f"], "gemma", "prod/stack.toml", True),
])
def test_logs_takes_f_for_follow_or_for_the_stack_file_before_the_model(
        argv: list[str], model: str, file: str, follow: bool) -> None:
    args = build_parser("logs").parse_args(argv)
    _check(args)
    assert (args.model, args.file, args.follow) == (model, file, follow)


def test_logs_without_a_model_is_named_with_a_hint(tmp_path: Path) -> None:
    result = subprocess.run([str(STACK), "logs", "-f"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    first, second = result.stderr.strip().splitlines()[-2:]
    assert first == "error: `stack logs` needs the model's name" and second.startswith("hint:")
