"""A `build`/`archive` runtime named by package: its sdist is fetched by name, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from stack.errors import ApplyError
from stack.wheelhouse import fetch_sdist


def test_sdist_is_fetched_by_name_once_and_then_served_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELSTACK_CACHE", str(tmp_path))
    first = fetch_sdist("six==1.16.0", "runtimes.x.package")
    assert first == tmp_path / "sdist" / "six-1.16.0.tar.gz"
    stamp = first.stat().st_mtime_ns
    assert fetch_sdist("six==1.16.0", "runtimes.x.package") == first
    assert first.stat().st_mtime_ns == stamp


def test_a_package_without_that_version_is_an_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELSTACK_CACHE", str(tmp_path))
    with pytest.raises(ApplyError) as err:
        fetch_sdist("six==0.0.0.999", "runtimes.x.package")
    assert "`runtimes.x.package`" in err.value.message
    assert err.value.hint
