"""Backend log files `PREFIX/logs/<id>.log`: rotation by size, time marks, reading.

A backend writes its output straight into its log (no timestamps per line, and not through
the agent, which it outlives), so the agent records where the log stood when: every
`ROTATE_EVERY` seconds (agent/reconcile.py) it appends `TIME SIZE` to `<id>.log.marks` if
the log grew. Every byte after a mark's size was written after its time, so reading "since
T" starts at the last mark at or before T: at most one mark interval too early, never
late. Marks move with their log when it rotates (`<id>.log.1.marks`).

`python -m agent.logs LOG [--since SECONDS] [--tail N] [--follow]` prints a log this way
on the host (what `stack logs` runs over SSH); `--follow` goes on like `tail -F`: through
copy-and-truncate rotation and a restarted backend, until its stdin closes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import select
import shutil
import sys
import time
from pathlib import Path
from typing import BinaryIO

MARKS_MAX_BYTES = 64 * 1024  # about 3,000 marks; beyond, every other one is dropped
FOLLOW_POLL = 0.25  # seconds between looks at a followed log


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
        for older in (path.with_name(f"{path.name}.{n}"), marks_path(
                path.with_name(f"{path.name}.{n}"))):
            if older.exists():
                os.replace(older, older.with_name(older.name.replace(
                    f".log.{n}", f".log.{n + 1}", 1)))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with open(path, "r+b") as fh:
        fh.truncate(0)
    if marks_path(path).exists():
        os.replace(marks_path(path), marks_path(path.with_name(f"{path.name}.1")))
    return True


def marks_path(log: Path) -> Path:
    """The time marks of a log: lines `UNIX_TIME SIZE`."""
    return log.with_name(f"{log.name}.marks")


def read_marks(log: Path) -> list[tuple[float, int]]:
    """A log's marks, oldest first (none when it has no marks file); bad lines skipped."""
    try:
        text = marks_path(log).read_text(errors="replace")
    except FileNotFoundError:
        return []
    marks = []
    for line in text.splitlines():
        when, _, size = line.partition(" ")
        try:
            marks.append((float(when), int(size)))
        except ValueError:
            continue
    return marks


def mark(log: Path, now: float) -> bool:
    """Record that `log` has its current size at `now`, if it changed since the last mark.
    Returns True when it wrote a mark."""
    try:
        size = log.stat().st_size
    except FileNotFoundError:
        return False
    marks = marks_path(log)
    try:
        with open(marks, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 64))
            last = fh.read().splitlines()[-1:]
    except FileNotFoundError:
        last = []
    if last and last[0].rpartition(b" ")[2] == str(size).encode():
        return False
    with open(marks, "a") as out:
        out.write(f"{now:.3f} {size}\n")
    if marks.stat().st_size > MARKS_MAX_BYTES:
        kept = read_marks(log)[::-1][::2][::-1]  # every other one, the newest kept
        tmp = marks.with_name(f".{marks.name}.tmp")
        tmp.write_text("".join(f"{t:.3f} {s}\n" for t, s in kept))
        os.replace(tmp, marks)
    return True


def since_offset(marks: list[tuple[float, int]], since: float) -> int | None:
    """Where to start reading a log for output written at or after `since`: the size at the
    last mark at or before it; None when every mark is later (or there is none)."""
    found = None
    for when, size in marks:
        if when > since:
            break
        found = size
    return found


def since_parts(log: Path, since: float) -> list[tuple[Path, int]]:
    """The (file, offset) parts that hold a log's output since `since`, oldest first: the
    rotated files (`.1`, `.2`, ...) only as far back as needed."""
    parts: list[tuple[Path, int]] = []
    generation = 0
    while True:
        path = log if generation == 0 else log.with_name(f"{log.name}.{generation}")
        if not path.exists():
            break
        offset = since_offset(read_marks(path), since)
        parts.insert(0, (path, offset or 0))
        if offset is not None:
            break
        generation += 1
    return parts


def tail_offset(path: Path, lines: int, max_bytes: int = 1 << 20) -> int:
    """Where the last `lines` lines of a file start (within its last `max_bytes`)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            fh.seek(start)
            data = fh.read()
    except FileNotFoundError:
        return 0
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(lines):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            return start
    return start + pos + 1


def _copy(path: Path, offset: int, out: BinaryIO) -> int:
    """Write a file from `offset` to its current end; returns where it stopped."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(1 << 16):
            out.write(chunk)
            offset += len(chunk)
    out.flush()
    return offset


def write_parts(parts: list[tuple[Path, int]], out: BinaryIO, last: int | None = None) -> int:
    """Write the parts (only their `last` lines, if given); returns the offset reached in
    the last part (the live log), where following goes on."""
    reached = 0
    if last is None:
        for path, offset in parts:
            reached = _copy(path, offset, out)
        return reached
    kept: collections.deque[bytes] = collections.deque(maxlen=last)
    for path, offset in parts:
        with open(path, "rb") as fh:
            fh.seek(offset)
            kept.extend(fh)
            reached = fh.tell()
    out.writelines(kept)
    out.flush()
    return reached


def _stdin_closed(timeout: float) -> bool:
    """Wait up to `timeout` for the reader to go away (our stdin at its end)."""
    ready, _, _ = select.select([sys.stdin.fileno()], [], [], timeout)
    return bool(ready) and not os.read(sys.stdin.fileno(), 4096)


def follow(path: Path, position: int, out: BinaryIO) -> None:
    """Write what the log gets after `position`, like `tail -F`: after copy-and-truncate
    rotation (or a new file) from its start. Returns when stdin closes."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        inode = -1
    while not _stdin_closed(FOLLOW_POLL):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_ino != inode or st.st_size < position:
            inode, position = st.st_ino, 0
        if st.st_size > position:
            position = _copy(path, position, out)


def main(argv: list[str] | None = None) -> int:
    """`python -m agent.logs`: print (and follow) one log; see the module's docstring."""
    parser = argparse.ArgumentParser(prog="python -m agent.logs")
    parser.add_argument("log", type=Path)
    parser.add_argument("--since", type=float, metavar="SECONDS",
                        help="only output written in the last SECONDS (by the marks)")
    parser.add_argument("--tail", type=int, metavar="N",
                        help="only the last N lines (default 100 without --since)")
    parser.add_argument("--follow", action="store_true", help="go on until stdin closes")
    args = parser.parse_args(argv)
    if not args.log.is_file():
        print(f"no log at {args.log}", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    if args.since is None:
        lines = 100 if args.tail is None else args.tail
        position = _copy(args.log, tail_offset(args.log, lines), out)
    else:
        parts = since_parts(args.log, time.time() - args.since)
        position = write_parts(parts, out, args.tail)
    if args.follow:
        with contextlib.suppress(BrokenPipeError):  # the reader went away
            follow(args.log, position, out)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
