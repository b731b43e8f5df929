"""The apply lock: two applies of one stack never interleave.

Two layers, both holding the same lock ID, owner and time:
- `.stack/lock` beside stack.toml (created with O_EXCL), which stops a second apply from
  the same checkout before any SSH;
- `PREFIX/state/apply.lock` on every host (created with the shell's noclobber), which
  stops a second apply from another checkout or CI runner that reaches the same hosts.

A lock left by a killed apply is removed with `stack force-unlock ID`.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import secrets
import shlex
import socket
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from stack.errors import LockError

LOCAL_LOCK = Path(".stack") / "lock"


@dataclass(frozen=True)
class LockInfo:
    """Who holds the lock."""

    id: str
    owner: str
    created: str
    pid: int

    def describe(self) -> str:
        return f"lock `{self.id}` held by {self.owner} since {self.created}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def new_lock(now: datetime | None = None) -> LockInfo:
    """A fresh lock value for this process."""
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    owner = f"{getpass.getuser()}@{socket.gethostname()}"
    return LockInfo(id=secrets.token_hex(4), owner=owner, created=when, pid=os.getpid())


def parse_lock(text: str) -> LockInfo | None:
    """A lock file's content, or None when it is not a lock we wrote."""
    try:
        data = json.loads(text)
        return LockInfo(id=str(data["id"]), owner=str(data["owner"]),
                        created=str(data["created"]), pid=int(data.get("pid", 0)))
    except (ValueError, KeyError, TypeError):
        return None


def _held(info: LockInfo, where: str) -> LockError:
    return LockError(
        f"another apply holds the stack's lock ({info.describe()}, in {where})",
        hint=f"wait for it to finish; if it was killed, run `stack force-unlock {info.id}`.",
    )


def acquire_local(stack_dir: Path, info: LockInfo) -> None:
    """Take `.stack/lock` beside stack.toml, or raise `LockError` naming the holder."""
    path = stack_dir / LOCAL_LOCK
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        holder = parse_lock(path.read_text()) or LockInfo("?", "unknown", "?", 0)
        raise _held(holder, str(path)) from None
    with os.fdopen(fd, "w") as handle:
        handle.write(info.to_json() + "\n")


def release_local(stack_dir: Path, lock_id: str) -> bool:
    """Remove `.stack/lock` if it holds `lock_id`; True when removed."""
    path = stack_dir / LOCAL_LOCK
    try:
        holder = parse_lock(path.read_text())
    except FileNotFoundError:
        return False
    if holder is None or holder.id != lock_id:
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


def read_local(stack_dir: Path) -> LockInfo | None:
    """The local lock's holder, if any."""
    try:
        return parse_lock((stack_dir / LOCAL_LOCK).read_text())
    except FileNotFoundError:
        return None


def host_lock_path(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/state/apply.lock"


def host_acquire_script(prefix: str, info: LockInfo) -> str:
    """Shell that takes the host lock; on a held lock prints `LOCKED <content>`, exits 0."""
    path = shlex.quote(host_lock_path(prefix))
    folder = shlex.quote(prefix.rstrip("/") + "/state")
    body = shlex.quote(info.to_json())
    return (
        f"mkdir -p {folder} && if ( set -C; printf '%s\\n' {body} > {path} ) 2>/dev/null; "
        f"then echo LOCK-OK; elif grep -q {shlex.quote(info.id)} {path}; then echo LOCK-OK; "
        f"else printf 'LOCKED '; cat {path}; fi"
    )


def host_release_script(prefix: str, lock_id: str) -> str:
    """Shell that removes the host lock if it holds `lock_id` (force-unlock uses it too)."""
    path = shlex.quote(host_lock_path(prefix))
    return f"if [ -f {path} ] && grep -q {shlex.quote(lock_id)} {path}; then rm -f {path}; fi"


def check_host_lock(output: str, node: str) -> None:
    """Raise `LockError` when `host_acquire_script`'s output says someone else holds it."""
    for line in output.splitlines():
        if line.startswith("LOCKED "):
            holder = parse_lock(line[len("LOCKED "):]) or LockInfo("?", "unknown", "?", 0)
            raise _held(holder, f"`{node}`")
