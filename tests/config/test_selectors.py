"""Every case in `selectors/*.json` is a list of selector checks:
`{"selector": [...], "describe": "...", "match": [labels...], "no_match": [labels...]}`
or `{"selector": [...], "error": "...", "index": N}`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stack.selector import SelectorError, parse_selector

CASES = sorted((Path(__file__).parent / "selectors").glob("*.json"))


@pytest.mark.parametrize("case_file", CASES, ids=[c.stem for c in CASES])
def test_selector_case(case_file: Path) -> None:
    checks: list[dict[str, Any]] = json.loads(case_file.read_text())
    assert checks
    for check in checks:
        if "error" in check:
            with pytest.raises(SelectorError) as caught:
                parse_selector(check["selector"])
            assert str(caught.value) == check["error"]
            assert caught.value.index == check["index"]
            continue
        selector = parse_selector(check["selector"])
        assert selector.describe() == check["describe"]
        assert check["match"] or check["no_match"]
        for labels in check["match"]:
            assert selector.matches(labels), (check["selector"], labels)
        for labels in check["no_match"]:
            assert not selector.matches(labels), (check["selector"], labels)
