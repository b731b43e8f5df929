"""Backend logs on the host (agent/logs.py): time marks, reading "since", rotation with
its marks, and `python -m agent.logs --follow` as a real process across a truncation."""

from __future__ import annotations

import itertools
import select
import subprocess
import sys
from pathlib import Path

from agent.logs import (
    MARKS_MAX_BYTES,
    mark,
    marks_path,
    read_marks,
    rotate_if_large,
    since_parts,
    tail_offset,
    write_parts,
)


def _append(path: Path, text: str) -> None:
    with open(path, "a") as out:
        out.write(text)


def test_a_mark_is_written_only_when_the_log_grew(tmp_path: Path) -> None:
    log = tmp_path / "m-0.log"
    assert not mark(log, 100.0)  # no log yet
    _append(log, "one\n")
    assert mark(log, 100.0)
    assert not mark(log, 110.0)
    _append(log, "two\n")
    assert mark(log, 120.0)
    assert read_marks(log) == [(100.0, 4), (120.0, 8)]


def test_since_starts_at_the_last_mark_at_or_before_it_and_reaches_into_rotated_logs(
        tmp_path: Path) -> None:
    log = tmp_path / "m-0.log"
    _append(log, "old-1\n")
    mark(log, 100.0)
    _append(log, "old-2\n")
    mark(log, 110.0)
    assert rotate_if_large(log, max_bytes=1, keep=2)  # marks go with the log to .1
    assert read_marks(tmp_path / "m-0.log.1") == [(100.0, 6), (110.0, 12)]
    assert not marks_path(log).exists()
    _append(log, "new-1\n")
    mark(log, 120.0)
    _append(log, "new-2\n")
    mark(log, 130.0)

    def since(t: float) -> str:
        out = tmp_path / "out"
        with open(out, "wb") as fh:
            write_parts(since_parts(log, t), fh)
        return out.read_text()

    assert since(125.0) == "new-2\n"
    assert since(120.0) == "new-2\n"
    assert since(119.0) == "new-1\nnew-2\n"  # .1's last mark (110) is before: from there
    assert since(105.0) == "old-2\nnew-1\nnew-2\n"
    assert since(50.0) == "old-1\nold-2\nnew-1\nnew-2\n"


def test_marks_are_thinned_when_the_file_grows_large(tmp_path: Path) -> None:
    log = tmp_path / "m-0.log"
    for n in range(MARKS_MAX_BYTES // 10):
        _append(log, "x\n")
        mark(log, 1_000_000_000.0 + n)
    assert marks_path(log).stat().st_size <= MARKS_MAX_BYTES
    marks = read_marks(log)
    assert marks[-1][1] == log.stat().st_size  # the newest mark is kept
    assert all(a < b for (a, _), (b, _) in itertools.pairwise(marks))


def test_tail_offset_counts_lines_from_the_end(tmp_path: Path) -> None:
    log = tmp_path / "m-0.log"
    log.write_text("a\nb\nc\n")
    assert log.read_bytes()[tail_offset(log, 2):] == b"b\nc\n"
    assert tail_offset(log, 9) == 0 and tail_offset(log, 0) == 6


def _line(proc: subprocess.Popen[bytes]) -> bytes:
    """The follower's next line, or a failure after 30 s (never a hung test)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready, "the follower printed nothing within 30 s"
    return proc.stdout.readline()


def test_follow_goes_on_after_truncation_and_ends_when_stdin_closes(tmp_path: Path) -> None:
    log = tmp_path / "m-0.log"
    log.write_text("before-1\nbefore-2\n")
    proc = subprocess.Popen([sys.executable, "-m", "agent.logs", str(log), "--tail", "1",
                             "--follow"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert _line(proc) == b"before-2\n"
        _append(log, "appended\n")
        assert _line(proc) == b"appended\n"
        with open(log, "r+b") as fh:  # the agent's copy-and-truncate rotation
            fh.truncate(0)
        _append(log, "after-rotation\n")  # shorter than what was read: seen as truncated
        assert _line(proc) == b"after-rotation\n"
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
