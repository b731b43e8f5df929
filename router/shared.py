"""State shared by the worker processes of one router (`workers` > 1) on one host.

- Rate limits: one table in shared memory (a memfd the parent maps before forking), one
  slot per key hash holding the key's request and token windows. An admission locks its
  slot's byte range with `fcntl.lockf` (the kernel drops the lock of a worker that dies),
  so `rpm`/`tpm` hold across workers. Cost on the hot path: two lock syscalls, only for
  keys that have limits.
- Load: one row per replica (claimed by a hash of its model, id, URL and key) with a cell
  per worker holding that worker's requests in flight on it. Each worker writes only its
  own cell; the balancer sums the row, so least-outstanding sees every worker's requests.
  Cost on the hot path: a store per request start and end, and a sum of `workers` cells
  per candidate replica. A restarted worker zeroes its cells (its requests died with it).
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
LIMITS_BYTES = SLOTS * SLOT_BYTES
REPLICA_ROWS = 1024
"""Distinct replicas the load table holds (rows are never freed; a changed replica takes a
new one)."""
REPLICA_ID_BYTES = 16
MAX_WORKERS = 64
REPLICA_ROW_BYTES = REPLICA_ID_BYTES + MAX_WORKERS * 8
TABLE_BYTES = LIMITS_BYTES + REPLICA_ROWS * REPLICA_ROW_BYTES
CLAIM_LOCK = TABLE_BYTES
"""The byte (past the tables) locked while a slot or a row is claimed."""
PEER_TIMEOUT = 1.0

assert ID_BYTES + CELLS * 8 <= SLOT_BYTES


class SharedState:
    """Created by the parent before forking; every worker inherits the mapping."""

    def __init__(self, workers: int) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1 to {MAX_WORKERS}, got {workers}")
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
        self.rows: dict[bytes, int] = {}
        """Row of each replica id this process has looked up."""

    # limits

    @contextlib.contextmanager
    def locked(self, start: int) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, start)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, start)

    def _claim(self, ident: bytes, base: int, rows: int, row_bytes: int,
               known: dict[bytes, int]) -> tuple[int, bool] | None:
        """(row of `ident` in the table at `base`, whether it was just claimed); None when
        the table is full. Open addressing from the id's first bytes."""
        found = known.get(ident)
        if found is not None:
            return found, False
        empty = bytes(len(ident))
        start = int.from_bytes(ident[:8], "little") % rows
        with self.locked(CLAIM_LOCK):
            for step in range(rows):
                index = (start + step) % rows
                at = base + index * row_bytes
                held = bytes(self.view[at:at + len(ident)])
                if held in (ident, empty):
                    if held == empty:
                        self.view[at:at + len(ident)] = ident
                    known[ident] = index
                    return index, held == empty
        return None

    def slot(self, key_id: bytes) -> int | None:
        """The slot of `key_id` (32 bytes), claimed if new; None when the table is full."""
        claimed = self._claim(key_id, 0, SLOTS, SLOT_BYTES, self.slots)
        if claimed is None:
            return None
        index, new = claimed
        if new:
            base = index * SLOT_BYTES + ID_BYTES
            _init_cache(self.view[base:base + CELLS * 8].cast("q"))
        return index

    def replica_load(self, ident: bytes, slot: int) -> memoryview | None:
        """The in-flight cells (one per worker) of the replica `ident` (16 bytes), with this
        worker's (`slot`) set to 0; None when the table is full."""
        claimed = self._claim(ident, LIMITS_BYTES, REPLICA_ROWS, REPLICA_ROW_BYTES, self.rows)
        if claimed is None:
            log.warning("router: the shared load table is full; a replica's load is counted "
                        "per worker")
            return None
        at = LIMITS_BYTES + claimed[0] * REPLICA_ROW_BYTES + REPLICA_ID_BYTES
        cells = self.view[at:at + self.workers * 8].cast("q")
        cells[slot] = 0
        return cells

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

    def cancel(self, now: float, reservation: tuple[int, int]) -> None:
        fd, at = self.state.fd, self.lock_at
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, at)
        try:
            self.inner.cancel(now, reservation)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, at)
