"""State shared by the worker processes of one router (`workers` > 1) on one host.

- Rate limits: one table in shared memory (a memfd the parent maps before forking), one
  slot per key hash holding the key's request and token windows. An admission locks its
  slot's byte range with `fcntl.lockf` (the kernel drops the lock of a worker that dies),
  so `rpm`/`tpm` hold across workers. Cost on the hot path: two lock syscalls, only for
  keys that have limits.
- Metrics: each worker answers a snapshot of its counters on an abstract unix socket
  named after the router's token and the worker's slot; the worker that serves
  `/metrics` merges its siblings' snapshots into its own. Nothing on the hot path.

Several router hosts still count separately (see docs/router.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import secrets
import socket
import tempfile
from collections.abc import Callable, Iterator

from router.limits import WINDOW, KeyLimiter, Verdict, Window

log = logging.getLogger("stack-router")

SLOTS = 4096
"""Distinct key hashes the table holds (slots are never freed; revoked keys keep theirs)."""
ID_BYTES = 32
CELLS = 4 * WINDOW + 4
"""int64 cells per slot: request buckets and stamps, token buckets and stamps, and each
window's cached (second, total)."""
SLOT_BYTES = 2048
TABLE_BYTES = SLOTS * SLOT_BYTES
CLAIM_LOCK = TABLE_BYTES
"""The byte (past the table) locked while a slot is claimed."""
PEER_TIMEOUT = 1.0

assert ID_BYTES + CELLS * 8 <= SLOT_BYTES


class SharedState:
    """Created by the parent before forking; every worker inherits the mapping."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.token = secrets.token_hex(8)
        try:
            self.fd = os.memfd_create("stack-router-limits")
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            handle, name = tempfile.mkstemp(prefix="stack-router-limits-")
            os.unlink(name)
            self.fd = handle
        os.ftruncate(self.fd, TABLE_BYTES)
        self.map = mmap.mmap(self.fd, TABLE_BYTES, mmap.MAP_SHARED)
        self.view = memoryview(self.map)
        self.slots: dict[bytes, int] = {}
        """Slot of each key id this process has looked up."""

    # limits

    @contextlib.contextmanager
    def locked(self, start: int) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, start)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, start)

    def slot(self, key_id: bytes) -> int | None:
        """The slot of `key_id` (32 bytes), claimed if new; None when the table is full."""
        found = self.slots.get(key_id)
        if found is not None:
            return found
        empty = bytes(ID_BYTES)
        start = int.from_bytes(key_id[:8], "little") % SLOTS
        with self.locked(CLAIM_LOCK):
            for step in range(SLOTS):
                index = (start + step) % SLOTS
                base = index * SLOT_BYTES
                held = bytes(self.view[base:base + ID_BYTES])
                if held in (key_id, empty):
                    if held == empty:
                        self.view[base:base + ID_BYTES] = key_id
                        _init_cache(self.view[base + ID_BYTES:base + ID_BYTES + CELLS * 8]
                                    .cast("q"))
                    self.slots[key_id] = index
                    return index
        return None

    def limiter(self, key_hash: str, rpm: int | None, tpm: int | None) -> SharedKeyLimiter | None:
        """A limiter over the key's shared windows; None when the table is full."""
        key_id = bytes.fromhex(key_hash.removeprefix("sha256:"))
        index = self.slot(key_id)
        if index is None:
            log.warning("router: the shared limit table is full; a key is limited per worker")
            return None
        base = index * SLOT_BYTES + ID_BYTES
        cells = self.view[base:base + CELLS * 8].cast("q")
        caches = 4 * WINDOW
        requests = Window(cells[0:WINDOW], cells[WINDOW:2 * WINDOW], cells[caches:caches + 2])
        tokens = Window(cells[2 * WINDOW:3 * WINDOW], cells[3 * WINDOW:4 * WINDOW],
                        cells[caches + 2:caches + 4])
        return SharedKeyLimiter(self, index * SLOT_BYTES, KeyLimiter(rpm, tpm, requests, tokens))

    # metrics

    def address(self, slot: int) -> str:
        """Abstract unix socket name of a worker (nothing on disk to clean up)."""
        return f"\0modelstack-router-{self.token}-{slot}"

    async def serve_snapshots(self, slot: int, snapshot: Callable[[], bytes]) -> asyncio.Server:
        """Answer each connection on this worker's address with `snapshot()`, then close."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.address(slot))
        sock.listen(16)
        sock.setblocking(False)

        async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(snapshot())
                await writer.drain()
            finally:
                writer.close()

        return await asyncio.start_unix_server(answer, sock=sock)

    async def gather(self, own_slot: int) -> list[bytes]:
        """Snapshots of the other workers that answer within PEER_TIMEOUT."""
        async def fetch(slot: int) -> bytes | None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            writer = None
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
                    sock, self.address(slot)), PEER_TIMEOUT)
                reader, writer = await asyncio.open_unix_connection(sock=sock)
                return await asyncio.wait_for(reader.read(), PEER_TIMEOUT)
            except (OSError, TimeoutError):
                return None  # restarting or stuck: left out, `workers` says how many answered
            finally:
                if writer is not None:
                    writer.close()
                else:
                    sock.close()

        got = await asyncio.gather(*(fetch(s) for s in range(self.workers) if s != own_slot))
        return [g for g in got if g]


def _init_cache(cells: memoryview) -> None:
    """A new slot's window caches say "nothing cached" (second -1)."""
    cells[4 * WINDOW] = -1
    cells[4 * WINDOW + 2] = -1


class SharedKeyLimiter:
    """A key's limiter whose windows live in the shared table, used under the slot's lock."""

    __slots__ = ("inner", "lock_at", "state")

    def __init__(self, state: SharedState, lock_at: int, inner: KeyLimiter) -> None:
        self.state = state
        self.lock_at = lock_at
        self.inner = inner

    def admit(self, now: float, estimate: int) -> Verdict:
        fd, at = self.state.fd, self.lock_at
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, at)
        try:
            return self.inner.admit(now, estimate)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, at)

    def settle(self, now: float, reservation: tuple[int, int], used: int) -> None:
        if self.inner.tpm is None:
            return
        fd, at = self.state.fd, self.lock_at
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, at)
        try:
            self.inner.settle(now, reservation, used)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, at)
