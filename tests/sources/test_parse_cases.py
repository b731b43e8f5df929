"""Every case in cases/*.json: a source text and its parsed form or its error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stack.errors import SourceError
from stack.sources import parse_source

CASES = Path(__file__).parent / "cases"


def _load(kind: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(CASES.glob("*.json")):
        out += json.loads(path.read_text()).get(kind, [])
    return out


@pytest.mark.parametrize("case", _load("valid"), ids=lambda c: c["text"])
def test_source_parses_to_its_parts(case: dict[str, Any]) -> None:
    source = parse_source(case["text"])
    for key, value in case["expect"].items():
        assert getattr(source, key) == value, key
    assert parse_source(source.text) == source  # the canonical spelling parses back


@pytest.mark.parametrize("case", _load("invalid"), ids=lambda c: c["text"] or "empty")
def test_bad_source_is_refused_with_a_hint(case: dict[str, Any]) -> None:
    with pytest.raises(SourceError) as info:
        parse_source(case["text"])
    assert case["error"] in info.value.message
    assert case["hint"] in info.value.hint
