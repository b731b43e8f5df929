"""The process table behind `agent.procs`: both implementations against real processes.

`ProcfsTable` (Linux) and `PsTable` (macOS) run here on the same child processes: alive,
zombie, reaped, the members of a process group, the exact argv. `PsTable` runs for real
because procps prints the columns BSD `ps` prints; its argv comes from /proc here and
from sysctl KERN_PROCARGS2 on macOS, which this Linux machine cannot call (glibc has no
sysctl()): that reader is tested at its seam, the buffer parser and the libc call with a
stand-in libc. Nothing here ran on a Mac.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import procs, proctable
from agent.errors import AgentError
from agent.proctable import (
    ProcessTable,
    ProcfsTable,
    PsRow,
    PsTable,
    parse_procargs2,
    parse_ps_rows,
    sysctl_argv,
    table,
    table_for,
)

HERE = Path(__file__).parent
TABLES: dict[str, Callable[[], ProcessTable]] = {
    "procfs": ProcfsTable,
    "ps": lambda: PsTable(ProcfsTable().cmdline),
}


@pytest.fixture(params=sorted(TABLES))
def ptable(request: pytest.FixtureRequest) -> ProcessTable:
    return TABLES[request.param]()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()


def _start(children: list[subprocess.Popen[bytes]], argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL)
    children.append(proc)
    return proc


def _wait(check: Callable[[], bool], timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return False


# ---- both tables, real processes --------------------------------------------------------

def test_a_running_backend_is_alive_and_reads_back_its_exact_argv(
    ptable: ProcessTable, children: list[subprocess.Popen[bytes]]
) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(30)", "a model/with space & <x>", ""]
    proc = _start(children, argv)
    assert _wait(lambda: ptable.cmdline(proc.pid) == argv)
    assert ptable.alive(proc.pid)


def test_a_zombie_is_neither_alive_nor_a_member_of_its_group(
    ptable: ProcessTable, children: list[subprocess.Popen[bytes]]
) -> None:
    proc = _start(children, ["true"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert not ptable.alive(proc.pid)
    assert ptable.group_members(proc.pid) == []


def test_a_reaped_pid_is_not_alive_and_has_no_argv(
    ptable: ProcessTable, children: list[subprocess.Popen[bytes]]
) -> None:
    proc = _start(children, ["true"])
    proc.wait()
    assert not ptable.alive(proc.pid)
    assert ptable.cmdline(proc.pid) is None


def test_group_members_are_the_live_processes_of_that_group_only(
    ptable: ProcessTable, children: list[subprocess.Popen[bytes]]
) -> None:
    leader = _start(children, ["sh", "-c", "sleep 30 & sleep 30 & wait"])
    other = _start(children, ["sleep", "30"])
    assert _wait(lambda: len(ptable.group_members(leader.pid)) == 3)
    members = ptable.group_members(leader.pid)
    assert leader.pid in members and other.pid not in members
    assert ptable.group_members(other.pid) == [other.pid]
    os.killpg(leader.pid, signal.SIGKILL)
    assert _wait(lambda: ptable.group_members(leader.pid) == [])


# ---- procs through the ps table ---------------------------------------------------------

def test_procs_adopts_and_stops_a_group_through_the_ps_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(procs, "table", lambda: PsTable(ProcfsTable().cmdline))
    argv = ["sh", "-c", "trap '' TERM; sleep 30 & wait", "my backend"]
    proc = procs.spawn(argv, dict(os.environ), tmp_path / "b.log", tmp_path)
    try:
        rec = procs.ProcRecord("m-0", proc.pid, proc.pid, "s", "i", 1, "127.0.0.1", argv, 0.0)
        assert _wait(lambda: procs.matches(rec))
        assert not procs.matches(procs.ProcRecord(**{**rec.__dict__, "cmdline": ["sh"]}))
        assert _wait(lambda: len(procs.group_members(proc.pid)) == 2)
        # SIGTERM is ignored by the whole group: stopping needs SIGKILL and says so
        assert asyncio.run(procs.stop_group(proc.pid, 0.5, proc)) is True
        assert procs.group_members(proc.pid) == []
        assert not procs.matches(rec)
    finally:
        procs.signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_group_that_takes_sigterm_stops_without_sigkill_through_the_ps_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(procs, "table", lambda: PsTable(ProcfsTable().cmdline))
    proc = procs.spawn(["sleep", "30"], dict(os.environ), tmp_path / "b.log", tmp_path)
    try:
        assert asyncio.run(procs.stop_group(proc.pid, 5, proc)) is False
    finally:
        procs.signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


# ---- ps output --------------------------------------------------------------------------

def test_ps_rows_of_a_capture_taken_here_mark_the_zombie_dead() -> None:
    # `ps -A -o pid=,pgid=,stat=` (procps-ng 4.0.2) with a zombie and a session leader
    rows = parse_ps_rows((HERE / "ps" / "procps-4.0.2-A-pid-pgid-stat.txt").read_text())
    assert rows[0] == PsRow(1, 0, "S<Ll")
    assert [(r.pid, r.pgid, r.alive) for r in rows[-2:]] == [(10113, 10069, False),
                                                             (10114, 10114, True)]


def test_ps_rows_read_the_bsd_states_and_skip_what_is_not_a_row() -> None:
    # the first letters macOS ps(1) documents (I R S T U Z, `?` unknown) with its flags;
    # built from the manual's list, not captured on a Mac
    text = ("    1     1 Ss\n  312   312 I\n  400   312 R+\n  401   312 U\n"
            "  402   312 Z\n  403   312 T\n  404   312 ?\n  PID  PGID STAT\n\n")
    rows = parse_ps_rows(text)
    assert [r.pid for r in rows] == [1, 312, 400, 401, 402, 403, 404]
    assert [r.pid for r in rows if not r.alive] == [402]


def test_ps_table_without_ps_fails_with_a_hint(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AgentError, match="could not list processes with `ps`") as err:
        PsTable(ProcfsTable().cmdline).group_members(1)
    assert "PATH" in err.value.hint


def test_ps_table_asks_ps_about_one_pid_and_skips_ps_for_a_gone_one() -> None:
    calls: list[list[str]] = []

    def run_ps(args: list[str]) -> str:
        calls.append(args)
        return f"{os.getpid()} {os.getpgid(0)} S\n"

    ps_table = PsTable(lambda pid: None, run_ps)
    assert ps_table.alive(os.getpid())
    reaped = subprocess.Popen(["true"])
    reaped.wait()
    assert not ps_table.alive(reaped.pid)
    assert calls == [["-o", "pid=,pgid=,stat=", "-p", str(os.getpid())]]


# ---- KERN_PROCARGS2 (macOS argv) --------------------------------------------------------

def _procargs2(exec_path: bytes, args: list[bytes], pad: int = 3) -> bytes:
    """A KERN_PROCARGS2 buffer as xnu lays it out (bsd/kern/kern_sysctl.c,
    sysctl_procargsx): argc, the exec path, NUL padding, the args, the environment."""
    return (len(args).to_bytes(4, sys.byteorder) + exec_path + b"\0" * pad
            + b"".join(a + b"\0" for a in args) + b"HOME=/var/root\0PATH=/bin\0")


def test_procargs2_gives_each_argument_whole_and_leaves_the_environment() -> None:
    args = [b"/opt/stack/runtimes/llama-server", b"--model", b"/models/my model & co.gguf",
            b"", b"--alias", b"caf\xc3\xa9"]
    buf = _procargs2(b"/opt/stack/runtimes/llama-server", args)
    assert parse_procargs2(buf) == ["/opt/stack/runtimes/llama-server", "--model",
                                    "/models/my model & co.gguf", "", "--alias", "café"]


def test_procargs2_cut_short_or_empty_is_no_argv() -> None:
    buf = _procargs2(b"/bin/sleep", [b"sleep", b"30"])
    cut = buf[: buf.index(b"30")]
    assert parse_procargs2(cut) is None
    assert parse_procargs2(b"\x02\x00") is None
    assert parse_procargs2(b"\x01\x00\x00\x00/bin/sleep") is None


class _Sysctl:
    """Stands in for macOS libc's sysctl(3), called through the same C prototype, so the
    arguments are marshalled as on a Mac: answers KERN_ARGMAX and KERN_PROCARGS2."""

    def __init__(self, procs: dict[int, bytes]) -> None:
        self.procs = procs
        self.calls: list[tuple[list[int], int, int]] = []  # mib, buffer size, newlen

    def __call__(self, name: Any, namelen: int, buf: int, lenp: Any, new: Any,
                 newlen: int) -> int:
        mib = [name[i] for i in range(namelen)]
        self.calls.append((mib, lenp[0], newlen))
        assert new is None
        if mib == [1, 8]:
            data = (1024).to_bytes(ctypes.sizeof(ctypes.c_int), sys.byteorder)
        elif mib[:2] == [1, 49] and mib[2] in self.procs:
            data = self.procs[mib[2]]
        else:
            ctypes.set_errno(22)  # EINVAL
            return -1
        assert len(data) <= lenp[0]
        ctypes.memmove(buf, data, len(data))
        lenp[0] = len(data)
        return 0


def test_sysctl_argv_reads_argmax_then_the_pid_s_procargs2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _Sysctl({4242: _procargs2(b"/bin/sleep", [b"sleep", b"30"])})
    func = proctable.SYSCTL_PROTOTYPE(fake)
    monkeypatch.setattr(proctable, "_libc_sysctl", lambda: func)
    assert sysctl_argv(4242) == ["sleep", "30"]
    assert sysctl_argv(4243) is None  # the kernel refuses a gone pid or a zombie
    assert fake.calls == [([1, 8], 4, 0), ([1, 49, 4242], 1024, 0),
                          ([1, 8], 4, 0), ([1, 49, 4243], 1024, 0)]


def test_each_platform_gets_its_own_table() -> None:
    darwin = table_for("darwin")
    assert isinstance(darwin, PsTable) and darwin.argv_reader is sysctl_argv
    assert isinstance(table_for("linux"), ProcfsTable)
    assert isinstance(table(), ProcfsTable if sys.platform == "linux" else PsTable)
