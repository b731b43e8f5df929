"""Backend processes: start in their own session, records for adoption, stop by group.

A record per instance (`PREFIX/state/instances/<id>.json`: pid, pgid, spec_hash,
instance_hash, port, cmdline, started_at) lets a restarted agent adopt what is running:
the pid must be alive (not a zombie) and its argv must equal the recorded command line,
so a recycled pid is never mistaken for a backend. The process table is read through
`agent.proctable` (/proc on Linux, `ps` and sysctl on macOS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.proctable import table


@dataclass
class ProcRecord:
    """What the agent remembers about a running backend."""

    id: str
    pid: int
    pgid: int
    spec_hash: str
    instance_hash: str
    port: int
    host: str
    cmdline: list[str]
    started_at: float  # wall clock, seconds since the epoch
    restarts: int = 0


def write_private(path: Path, text: str) -> None:
    """Write a file with mode 0600 atomically (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # a temp file left by a crash keeps its mode through O_TRUNC, and may be a link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def record_path(folder: Path, instance_id: str) -> Path:
    return folder / f"{instance_id}.json"


def save_record(folder: Path, rec: ProcRecord) -> None:
    write_private(record_path(folder, rec.id), json.dumps(asdict(rec), sort_keys=True))


def load_records(folder: Path) -> list[ProcRecord]:
    """Every readable record; unreadable ones are removed."""
    records = []
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".mindie.json"):
            continue
        try:
            records.append(ProcRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
    return records


def remove_record(folder: Path, instance_id: str) -> None:
    record_path(folder, instance_id).unlink(missing_ok=True)


def proc_cmdline(pid: int) -> list[str] | None:
    """The process's argv, or None when it is gone or cannot be read."""
    return table().cmdline(pid)


def pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie."""
    return table().alive(pid)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    return table().group_members(pgid)


def matches(rec: ProcRecord) -> bool:
    """The recorded process is still the one we started."""
    return pid_alive(rec.pid) and proc_cmdline(rec.pid) == rec.cmdline


def port_listening(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (we could bind it ourselves)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def spawn(
    argv: list[str], env: dict[str, str], log_path: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    """Start a backend in its own session and process group, output appended to its log.

    The log is opened with O_APPEND, so rotation by copy-and-truncate keeps working and
    an adopted backend keeps writing after the agent restarts.
    """
    with open(log_path, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {argv[0]}\n".encode())
        out.flush()
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def stop_group(pgid: int, grace: float, proc: subprocess.Popen[bytes] | None) -> bool:
    """SIGTERM the group, wait up to `grace` seconds, then SIGKILL; True if SIGKILL was needed."""
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not group_members(pgid):
            return False
        await asyncio.sleep(0.1)
    signal_group(pgid, signal.SIGKILL)
    for _ in range(100):
        if proc is not None:
            proc.poll()
        if not group_members(pgid):
            break
        await asyncio.sleep(0.05)
    return True
