"""Vendor tool parsers against recorded real outputs: one JSON case per fixture.

A case (`cases/<vendor>/<name>.json`) names the parser (`parse_x` in `agent.gpus`, or
`module.function`), the fixture file under `fixtures/`, optional `kwargs`, and either
`expect` (the GPUs as dicts, or the plain return value) or `error` (`status`, `message`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

import agent.gpus
from agent.gpus import GpuToolError

HERE = Path(__file__).parent
CASES = sorted((HERE / "cases").rglob("*.json"))


def _parser(name: str) -> Any:
    if "." in name:
        module, _, func = name.rpartition(".")
        return getattr(importlib.import_module(f"agent.gpus.{module}"), func)
    return getattr(agent.gpus, name)


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_parser_reads_recorded_output(path: Path) -> None:
    case = json.loads(path.read_text())
    output = (HERE / "fixtures" / case["fixture"]).read_text()
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in case.get("kwargs", {}).items()}
    parse = _parser(case["parser"])
    if "error" in case:
        with pytest.raises(GpuToolError) as info:
            parse(output, **kwargs)
        assert str(info.value.status) == case["error"]["status"]
        assert info.value.message == case["error"]["message"]
        assert info.value.hint
        return
    result = parse(output, **kwargs)
    if isinstance(result, list):
        result = [gpu.to_dict() for gpu in result]
    assert result == case["expect"]


def test_every_fixture_parsed_by_a_case_exists() -> None:
    missing = [c for c in CASES if not (HERE / "fixtures" / json.loads(c.read_text())["fixture"])
               .exists()]
    assert missing == []
