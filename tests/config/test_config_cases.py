"""Every case in `cases/*.toml` is a stack.toml text and what loading it must give.

A case file holds:
- `stack`: the stack.toml text (a multi-line literal string; its line 1 is line 1);
- `[error]` `message` and `hint`: the first problem, exactly; or `[[errors]]`: all of them;
- `[expect]`: values of the loaded spec by `/`-separated path (`models/qwen/replicas`);
- `[node_settings.NODE]`: values of `node_settings(spec, NODE)`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from stack.config import check_text, node_settings

CASES = sorted((Path(__file__).parent / "cases").glob("*.toml"))


def _at(data: Any, path: str) -> Any:
    for part in path.split("/"):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


@pytest.mark.parametrize("case_file", CASES, ids=[c.stem for c in CASES])
def test_case(case_file: Path) -> None:
    case = tomllib.loads(case_file.read_text())
    assert {"error", "errors", "expect", "node_settings"} & set(case), "case checks nothing"
    spec, problems = check_text(case["stack"])
    found = [{"message": p.message, "hint": p.hint} for p in problems]
    if "error" in case:
        assert found, "expected an error, the stack loaded"
        assert found[0] == case["error"]
    if "errors" in case:
        assert found == case["errors"]
    if "expect" in case or "node_settings" in case:
        assert not found, found
        assert spec is not None
        dumped = spec.model_dump(mode="json")
        for path, value in case.get("expect", {}).items():
            assert _at(dumped, path) == value, path
        for node, values in case.get("node_settings", {}).items():
            settings = node_settings(spec, node).model_dump(mode="json")
            for path, value in values.items():
                assert _at(settings, path) == value, f"{node}: {path}"
