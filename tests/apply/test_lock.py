"""The apply lock: a second holder is refused with the holder named and the unlock hint;
host locks are taken atomically by shell, released only by their own ID."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stack.errors import LockError
from stack.lock import (
    acquire_local,
    check_host_lock,
    host_acquire_script,
    host_lock_path,
    host_release_script,
    new_lock,
    read_local,
    release_local,
)


def test_second_local_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first, second = new_lock(), new_lock()
    acquire_local(tmp_path, first)
    with pytest.raises(LockError) as err:
        acquire_local(tmp_path, second)
    assert first.id in err.value.message
    assert err.value.hint == (
        f"wait for it to finish; if it was killed, run `stack force-unlock {first.id}`."
    )
    assert not release_local(tmp_path, second.id)
    assert read_local(tmp_path) == first
    assert release_local(tmp_path, first.id)
    acquire_local(tmp_path, second)


def _sh(script: str) -> str:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                          check=True).stdout


def test_host_lock_is_exclusive_reentrant_and_released_by_its_id(tmp_path: Path) -> None:
    prefix = str(tmp_path / "pre fix")
    mine, other = new_lock(), new_lock()
    assert _sh(host_acquire_script(prefix, mine)).strip() == "LOCK-OK"
    assert _sh(host_acquire_script(prefix, mine)).strip() == "LOCK-OK"
    out = _sh(host_acquire_script(prefix, other))
    with pytest.raises(LockError, match=mine.id):
        check_host_lock(out, "gpu-01")
    _sh(host_release_script(prefix, other.id))
    assert Path(host_lock_path(prefix)).exists()
    _sh(host_release_script(prefix, mine.id))
    assert not Path(host_lock_path(prefix)).exists()
    check_host_lock(_sh(host_acquire_script(prefix, other)), "gpu-01")
