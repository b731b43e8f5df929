"""Fixtures for router tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from router_harness import Harness


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """Starts canned upstreams and the router; stops every process at the end."""
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()
