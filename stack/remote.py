"""Talking to hosts: one fleet session (connect ... disconnect), one command, one file.

Every command that touches hosts (apply, destroy, status, logs, force-unlock) opens the
fleet with `session()` and uses `run` and `write`; connection failures come back as
`Connected.errors` (one message and hint per host), never as exceptions.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from stack.errors import ApplyError
from stack.observe import Connected, connect, disconnect
from stack.spec import StackSpec


class Host(Protocol):
    """The slice of `pyinfra.api.Host` used here (so tests can pass fakes)."""

    name: str

    def run_shell_command(self, *args: Any, **kwargs: Any) -> Any: ...
    def put_file(self, *args: Any, **kwargs: Any) -> Any: ...


@contextlib.contextmanager
def session(spec: StackSpec, stack_dir: Path, *,
            hosts: list[str] | None = None) -> Iterator[Connected]:
    """The fleet (or `hosts`) connected for the time of the `with` block."""
    connected = connect(spec, stack_dir, hosts=hosts)
    try:
        yield connected
    finally:
        disconnect(connected)


def _sudo(host: Host) -> dict[str, Any]:
    """`[nodes."..."] sudo = true` (set on the host data by stack.observe)."""
    data = getattr(host, "data", None)
    return {"_sudo": True} if data is not None and data.get("_sudo") else {}


def run(host: Host, command: str) -> tuple[bool, str, str]:
    """One shell command on a host (with sudo where the node says so): (ok, out, err)."""
    from pyinfra.api.command import StringCommand

    ok, output = host.run_shell_command(
        StringCommand("sh", "-c", shlex.quote(command)), **_sudo(host))
    return bool(ok), output.stdout, output.stderr


def stream(host: Host, command: str, out: BinaryIO) -> tuple[int, str]:
    """One shell command whose output is copied to `out` as it comes: (exit code, stderr).

    Unlike `run`, the command's stdin stays open while it runs (a follower ends when it
    closes); the command ends when the caller is interrupted (Ctrl-C) and the channel
    closes.
    """
    import subprocess

    wrapped = ("sudo -n " if _sudo(host) else "") + f"sh -c {shlex.quote(command)}"
    client = getattr(host.connector, "client", None)  # type: ignore[attr-defined]
    if client is None:  # `@local`: this machine, no SSH
        proc = subprocess.Popen(["sh", "-c", wrapped], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stderr is not None
            while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                out.write(chunk)
                out.flush()
            return proc.wait(), proc.stderr.read().decode(errors="replace")
        finally:
            proc.kill()
    channel = client.get_transport().open_session()
    try:
        channel.exec_command(wrapped)
        while chunk := channel.recv(1 << 16):
            out.write(chunk)
            out.flush()
        code = channel.recv_exit_status()
        err = b""
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(1 << 16)
        return code, err.decode(errors="replace")
    finally:
        channel.close()


def write(host: Host, dest: str, content: bytes, mode: str = "600") -> None:
    """Write a file atomically over SFTP (`dest.tmp` then rename); ApplyError if not."""
    q = shlex.quote
    ok, _, err = run(host, f"mkdir -p {q(str(Path(dest).parent))}")
    if ok:
        ok = bool(host.put_file(io.BytesIO(content), dest + ".tmp", **_sudo(host)))
    if ok:
        tmp = q(dest + ".tmp")
        ok, _, err = run(host, f"chmod {mode} {tmp} && mv {tmp} {q(dest)}")
    if not ok:
        raise ApplyError(f"could not write `{dest}` on `{host.name}`: {err.strip()}",
                         hint="check the disk and the permissions of the prefix.")
