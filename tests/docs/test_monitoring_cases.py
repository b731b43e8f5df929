"""The Prometheus scrape config of `stack monitoring`, from data cases in `monitoring/`.

Each case: `stack_toml` (text), `facts` (a snapshot), `token_dir`, `expected` (the YAML
parsed), `text_contains` / `text_lacks` (substrings of the YAML text).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from stack.config import load_text
from stack.monitoring import render_scrape_config, scrape_targets
from stack.snapshot import Observed

CASES = sorted((Path(__file__).parent / "monitoring").glob("*.json"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_scrape_config_case(path: Path) -> None:
    case: dict[str, Any] = json.loads(path.read_text())
    spec = load_text(case["stack_toml"])
    observed = Observed.model_validate(case["facts"])
    text = render_scrape_config(scrape_targets(spec, observed), case["token_dir"])
    assert yaml.safe_load(text) == case["expected"], text
    for part in case["text_contains"]:
        assert part in text
    for part in case["text_lacks"]:
        assert part not in text


def test_there_are_cases() -> None:
    assert len(CASES) >= 4
