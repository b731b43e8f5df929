"""The host's process table, read the way the platform allows: `/proc` on Linux, `ps`
and `sysctl` on macOS.

The agent asks three things of it (`ProcessTable`): a process's exact argv (adoption
compares it with the recorded command line, so a recycled pid is never taken for a
backend), whether a pid is alive and not a zombie, and which live processes are in a
process group (stopping a backend waits for its whole group). `table()` picks the
implementation for this platform once.

    ProcfsTable   Linux: /proc/<pid>/cmdline, /proc/<pid>/stat, a scan of /proc
    PsTable       macOS: `ps -o stat=` and `ps -A -o pid=,pgid=,stat=` for states and
                  groups, argv from `sysctl` KERN_PROCARGS2 (through ctypes)

Why not `ps -o command=` for argv: it joins the arguments with spaces, so an argument
holding a space (a model path, a JSON option) would not compare equal to the record
and a running backend would be taken for a stranger. KERN_PROCARGS2 is what macOS's own
`ps` reads; it gives each argument as the process was started. psutil would do the same,
but it is a compiled dependency the agent does not otherwise need.

`PsTable` takes its argv reader as an argument, so the `ps` parts run for real on Linux
too (procps prints the same columns), with the argv read from /proc there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.errors import AgentError

# <sys/sysctl.h> on macOS
CTL_KERN = 1
KERN_ARGMAX = 8
KERN_PROCARGS2 = 49
# process states that are not alive: zombie (both), dead (Linux only)
_GONE = ("Z", "X")


class ProcessTable(Protocol):
    """What the agent reads about processes on this host."""

    def cmdline(self, pid: int) -> list[str] | None:
        """The process's argv as it was started, or None when it cannot be read."""

    def alive(self, pid: int) -> bool:
        """True when the process exists and is not a zombie."""

    def group_members(self, pgid: int) -> list[int]:
        """The live (non-zombie) processes of a process group."""


class ProcfsTable:
    """Linux: everything from /proc."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root

    def cmdline(self, pid: int) -> list[str] | None:
        try:
            raw = (self.root / str(pid) / "cmdline").read_bytes()
        except OSError:
            return None
        return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]

    def _stat_fields(self, pid: int) -> list[str] | None:
        try:
            text = (self.root / str(pid) / "stat").read_text()
        except OSError:
            return None
        # the command name is in parentheses and may hold spaces: split after the last ')'
        return text[text.rfind(")") + 2:].split()

    def alive(self, pid: int) -> bool:
        fields = self._stat_fields(pid)
        return fields is not None and fields[0] not in _GONE

    def group_members(self, pgid: int) -> list[int]:
        members = []
        for entry in os.scandir(self.root):
            if not entry.name.isdigit():
                continue
            fields = self._stat_fields(int(entry.name))
            if fields and fields[0] not in _GONE and int(fields[2]) == pgid:
                members.append(int(entry.name))
        return members


@dataclass(frozen=True)
class PsRow:
    """One line of `ps -o pid=,pgid=,stat=`."""

    pid: int
    pgid: int
    stat: str

    @property
    def alive(self) -> bool:
        return self.stat[:1] not in _GONE


def parse_ps_rows(text: str) -> list[PsRow]:
    """The rows of `ps -A -o pid=,pgid=,stat=` (BSD and procps print the same columns,
    right-aligned numbers, no header); a line that is not three fields is skipped."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit() and fields[1].isdigit():
            rows.append(PsRow(int(fields[0]), int(fields[1]), fields[2]))
    return rows


def _run_ps(args: list[str]) -> str:
    """The output of `ps ARGS`; exit status 1 with no output means no such process."""
    try:
        done = subprocess.run(["ps", *args], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"could not list processes with `ps`: {exc}",
                         hint="the agent needs `ps` in its PATH (/bin/ps on macOS).") from exc
    if done.returncode not in (0, 1):
        raise AgentError(f"`ps {' '.join(args)}` failed: {done.stderr.strip()}",
                         hint="check that `ps` runs for the agent's user.")
    return done.stdout


class PsTable:
    """States and groups from `ps`, argv from `argv_reader` (KERN_PROCARGS2 on macOS)."""

    def __init__(self, argv_reader: Callable[[int], list[str] | None],
                 run_ps: Callable[[list[str]], str] = _run_ps) -> None:
        self.argv_reader = argv_reader
        self.run_ps = run_ps

    def cmdline(self, pid: int) -> list[str] | None:
        return self.argv_reader(pid)  # the kernel gives none for a zombie or a gone pid

    def alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)  # a gone pid costs no fork of `ps`
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists, under another user
        rows = parse_ps_rows(self.run_ps(["-o", "pid=,pgid=,stat=", "-p", str(pid)]))
        return any(row.pid == pid and row.alive for row in rows)

    def group_members(self, pgid: int) -> list[int]:
        rows = parse_ps_rows(self.run_ps(["-A", "-o", "pid=,pgid=,stat="]))
        return [row.pid for row in rows if row.pgid == pgid and row.alive]


def parse_procargs2(buf: bytes) -> list[str] | None:
    """argv from a KERN_PROCARGS2 buffer: a native int argc, the executable's path, NUL
    padding, then argc NUL-terminated arguments (the environment follows; not read)."""
    if len(buf) < 4:
        return None
    argc = int.from_bytes(buf[:4], sys.byteorder)
    pos = buf.find(b"\0", 4)
    if pos < 0:
        return None
    while pos < len(buf) and buf[pos] == 0:
        pos += 1
    args = []
    for _ in range(argc):
        end = buf.find(b"\0", pos)
        if end < 0:
            return None  # cut short: not an argv to compare with
        args.append(buf[pos:end].decode(errors="replace"))
        pos = end + 1
    return args


# sysctl(3): int sysctl(int *name, u_int namelen, void *oldp, size_t *oldlenp,
#                       void *newp, size_t newlen); declared so ctypes passes each argument
# at its C width (an undeclared size_t would go as a 32-bit int)
SYSCTL_PROTOTYPE = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_uint, ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p, ctypes.c_size_t, use_errno=True)


@functools.cache
def _libc_sysctl() -> Callable[..., int]:
    """libc's sysctl() with its prototype (Darwin only: Linux's libc has none)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    func: Callable[..., int] = SYSCTL_PROTOTYPE(("sysctl", libc))
    return func


def _sysctl(mib: list[int], size: int) -> bytes | None:
    """One sysctl(3) read of up to `size` bytes; None when the kernel refuses (a gone
    pid, a zombie, another user's process)."""
    name = (ctypes.c_int * len(mib))(*mib)
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_size_t(size)
    if _libc_sysctl()(name, len(mib), buf, ctypes.byref(length), None, 0) != 0:
        return None
    return buf.raw[:length.value]


def sysctl_argv(pid: int) -> list[str] | None:
    """A process's exact argv on macOS (what `ps` itself reads). Darwin only: Linux's
    libc has no sysctl()."""
    argmax = _sysctl([CTL_KERN, KERN_ARGMAX], ctypes.sizeof(ctypes.c_int))
    if argmax is None:
        return None
    buf = _sysctl([CTL_KERN, KERN_PROCARGS2, pid], int.from_bytes(argmax, sys.byteorder))
    return None if buf is None else parse_procargs2(buf)


def table_for(platform: str) -> ProcessTable:
    """The process table of `platform` (a `sys.platform` value)."""
    if platform == "darwin":
        return PsTable(sysctl_argv)
    return ProcfsTable()


@functools.cache
def table() -> ProcessTable:
    """This host's process table."""
    return table_for(sys.platform)
