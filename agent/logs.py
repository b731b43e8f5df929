"""Backend log files `PREFIX/logs/<id>.log`: rotation by size and reading the tail."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def log_path(logs_dir: Path, instance_id: str) -> Path:
    return logs_dir / f"{instance_id}.log"


def rotate_if_large(path: Path, max_bytes: int, keep: int) -> bool:
    """Copy a log over `.1` (shifting older ones up to `.keep`) and truncate it.

    Copy-and-truncate, because the backend holds the file open (O_APPEND) and must not
    be restarted for rotation. Returns True when it rotated.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with open(path, "r+b") as fh:
        fh.truncate(0)
    return True


def tail(path: Path, lines: int, max_bytes: int = 1 << 20) -> list[str]:
    """The last `lines` lines of a file (reading at most `max_bytes` from its end)."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    text = data.decode(errors="replace").replace("\0", "")
    return text.splitlines()[-lines:]
