"""Backend command lines and environments, from the data cases in `commands/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.assignment import Instance
from agent.commands import Context, build_launch
from agent.errors import CommandError

CASES = sorted((Path(__file__).parent / "commands").glob("*.json"))


def _normalise(files: dict[str, str], expected: dict[str, Any]) -> dict[str, Any]:
    # generated JSON configs are compared as data, other files as text
    return {path: json.loads(text) if isinstance(expected.get(path), dict) else text
            for path, text in files.items()}


@pytest.mark.parametrize("case_file", CASES, ids=[c.stem for c in CASES])
def test_command_case(case_file: Path) -> None:
    case = json.loads(case_file.read_text())
    inst = Instance.model_validate(case["instance"])
    ctx = Context(case["model_path"], case.get("instance_dir", "/opt/stack/state/instances"))
    if "error" in case:
        with pytest.raises(CommandError) as err:
            build_launch(inst, ctx)
        assert case["error"] in err.value.text()
        return
    got = build_launch(inst, ctx).as_json()
    expect = case["expect"]
    got["files"] = _normalise(got["files"], expect["files"])  # type: ignore[arg-type]
    assert got == expect
