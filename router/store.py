"""Limits shared by several router hosts, kept in Redis (`limits.store` in router.json).

Each limited identity (a key by its hash, a user by name) is one Redis hash whose fields
are per-second buckets, `r:SECOND` (requests) and `t:SECOND` (tokens), over the last
WINDOW seconds by Redis's own clock (`TIME`, so router hosts need not agree on the
time). One script checks every identity of a request and, only when all have room,
counts the request in each: an admission is one round trip and atomic across hosts.
Settling a request's tokens is a second script, sent without waiting for its answer.

The client speaks RESP over one connection per worker (an asyncio protocol parsing the
replies from its buffer), requests pipelined in order. A
store that does not answer within `timeout` is down: by `on_store_down` the request is
counted by this process alone (`local`) or refused with a 503 (`refuse`); the worker
tries to reconnect once a second and shares again when it can. Each change is logged and
counted (`modelstack_router_limit_store_*` in /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from urllib.parse import unquote, urlsplit

from router.limits import WINDOW, Verdict

log = logging.getLogger("stack-router")

TIMEOUT = 0.5
"""Seconds a store call may take before the store counts as down."""
RETRY = 1.0
"""Seconds between reconnection attempts while the store is down."""
PREFIX = "modelstack:limits:"

# KEYS: one hash per identity; ARGV: window, estimate, then rpm and tpm per identity
# (0: none). Every identity with a `tpm` reserves the same tokens: the estimate, capped by
# the smallest `tpm`. Returns {1, second, tokens reserved} or {0, 2 * identity + (0 rpm,
# 1 tpm), retry after} (identities counted from 0).
ADMIT = """
local now = tonumber(redis.call('TIME')[1])
local window, estimate = tonumber(ARGV[1]), tonumber(ARGV[2])
local function live(key)
  local fields = redis.call('HGETALL', key)
  local r, t = {}, {}
  for i = 1, #fields, 2 do
    local kind, second = string.sub(fields[i], 1, 1), tonumber(string.sub(fields[i], 3))
    if second == nil or second <= now - window then
      redis.call('HDEL', key, fields[i])
    elseif kind == 'r' then
      r[#r + 1] = {second, tonumber(fields[i + 1])}
    else
      t[#t + 1] = {second, tonumber(fields[i + 1])}
    end
  end
  return r, t
end
local function retry(buckets, limit, need)
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  local excess = need - limit
  for _, b in ipairs(buckets) do excess = excess + b[2] end
  for _, b in ipairs(buckets) do
    excess = excess - b[2]
    if excess <= 0 then return math.max(1, b[1] + window - now) end
  end
  return window
end
local function total(buckets)
  local sum = 0
  for _, b in ipairs(buckets) do sum = sum + b[2] end
  return sum
end
local want, tokens = estimate, false
for i = 1, #KEYS do
  local tpm = tonumber(ARGV[2 + 2 * i])
  if tpm > 0 then want, tokens = math.min(want, tpm), true end
end
if not tokens then want = 0 end
for i, key in ipairs(KEYS) do
  local rpm, tpm = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local r, t = live(key)
  if rpm > 0 and total(r) + 1 > rpm then return {0, 2 * (i - 1), retry(r, rpm, 1)} end
  if tpm > 0 and total(t) + want > tpm then return {0, 2 * (i - 1) + 1, retry(t, tpm, want)} end
end
for i, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'r:' .. now, 1)
  if tonumber(ARGV[2 + 2 * i]) > 0 then redis.call('HINCRBY', key, 't:' .. now, want) end
  redis.call('EXPIRE', key, 2 * window)
end
return {1, now, want}
"""
# KEYS: the identities' hashes; ARGV: the second reserved in, the change of its tokens
SETTLE = """
local field = 't:' .. ARGV[1]
for _, key in ipairs(KEYS) do
  local old = tonumber(redis.call('HGET', key, field))
  if old ~= nil then
    redis.call('HSET', key, field, math.max(0, old + tonumber(ARGV[2])))
  end
end
return 1
"""


class StoreError(Exception):
    """The store did not answer, or answered with an error."""


def _command(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class IncompleteReply(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


MAX_REPLY = 1 << 20
"""Bytes of replies the connection buffers; more unparsed is no reply of ours."""


def parse_reply(buf: bytes, pos: int = 0) -> tuple[object, int]:
    """One RESP2 reply at `buf[pos:]`: (a string, an int, None, a list of replies, or a
    StoreError; the position after it). `IncompleteReply` when the reply is not all there."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise IncompleteReply
    kind, rest = buf[pos:pos + 1], buf[pos + 1:end]
    pos = end + 2
    if kind == b"+":
        return rest, pos
    if kind == b"-":
        return StoreError(rest.decode(errors="replace")), pos
    if kind == b":":
        return int(rest), pos
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise IncompleteReply
        return buf[pos:pos + n], pos + n + 2
    if kind == b"*":
        n = int(rest)
        items = []
        for _ in range(max(n, 0)):
            item, pos = parse_reply(buf, pos)
            items.append(item)
        return (items if n >= 0 else None), pos
    raise StoreError(f"unexpected reply {(kind + rest)[:40]!r}")


class Connection(asyncio.Protocol):
    """One RESP connection; calls are pipelined and answered in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[object]] = deque()
        self.buf = b""
        self.closed = False
        self.why: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        try:
            while pos < len(buf):
                reply, pos = parse_reply(buf, pos)
                if self.waiting:
                    future = self.waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
        except IncompleteReply:
            pass
        except (ValueError, StoreError) as exc:
            self.close(exc)
            return
        self.buf = buf[pos:]
        if len(self.buf) > MAX_REPLY:
            self.close(StoreError("a reply larger than any this router asks for"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(exc)

    def call(self, *args: bytes) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            future.set_exception(StoreError("the connection is closed"))
            return future
        self.waiting.append(future)
        self.transport.write(_command(*args))
        return future

    def close(self, exc: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed, self.why = True, exc
        if self.transport is not None:
            self.transport.close()
        for future in self.waiting:
            if not future.done():
                future.set_exception(StoreError(f"the store went away: {exc}"))
        self.waiting.clear()


class Store:
    """The shared limit store of one worker: Redis at `url`, or down."""

    def __init__(self, url: str, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.password = unquote(parts.password) if parts.password else None
        self.username = unquote(parts.username) if parts.username else None
        path = parts.path.strip("/")
        self.db = int(path) if path else 0
        self.timeout = timeout
        self.conn: Connection | None = None
        self.up = False
        self.next_try = 0.0
        self.connecting: asyncio.Task[None] | None = None
        self.changes = 0
        """Times the store went down or came back (a metric)."""
        self.fallbacks = 0
        """Requests admitted or refused without the store because it was down."""
        self.sha = {name: hashlib.sha1(body.encode()).hexdigest().encode()
                    for name, body in (("admit", ADMIT), ("settle", SETTLE))}

    def where(self) -> str:
        return f"{self.host}:{self.port}/{self.db}"

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Connection, self.host, self.port)
        try:
            if self.password is not None:
                auth = [self.username.encode()] if self.username else []
                self._check(await self._wait(conn.call(b"AUTH", *auth, self.password.encode())))
            if self.db:
                self._check(await self._wait(conn.call(b"SELECT", str(self.db).encode())))
            for body in (ADMIT, SETTLE):
                self._check(await self._wait(conn.call(b"SCRIPT", b"LOAD", body.encode())))
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    async def _wait(self, future: asyncio.Future[object]) -> object:
        """The answer, or a StoreError after `timeout` (a timer, not a task per call)."""
        timer = asyncio.get_running_loop().call_later(self.timeout, _expire, future,
                                                       self.timeout)
        try:
            return await future
        finally:
            timer.cancel()

    @staticmethod
    def _check(reply: object) -> object:
        if isinstance(reply, StoreError):
            raise reply
        return reply

    def _down(self, why: object) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.next_try = time.monotonic() + RETRY
        if self.up:
            self.up = False
            self.changes += 1
            log.warning("router: the limit store %s is down (%s); limits are counted by "
                        "the fallback until it is back", self.where(), why)

    async def ready(self) -> bool:
        """Whether the store can be used now (reconnecting at most once a second)."""
        if self.conn is not None:
            if not self.conn.closed:
                return True
            why = self.conn.why
            self._down(why or "the connection closed")
        if time.monotonic() < self.next_try:
            return False
        self.next_try = time.monotonic() + RETRY
        try:
            await asyncio.wait_for(self._connect(), self.timeout * 2)
        except (OSError, TimeoutError, StoreError, ValueError) as exc:
            self._down(exc)
            return False
        if not self.up:
            self.up = True
            self.changes += 1
            log.warning("router: the limit store %s is up; limits are shared", self.where())
        return True

    async def admit(self, identities: list[tuple[str, int | None, int | None]],
                    estimate: int) -> Verdict | None:
        """Admit a request against every identity (name, rpm, tpm) at once; None when the
        store is down (the caller falls back)."""
        if not await self.ready():
            return None
        assert self.conn is not None
        keys = [(PREFIX + name).encode() for name, _, _ in identities]
        args = [str(WINDOW).encode(), str(max(0, estimate)).encode()]
        for _, rpm, tpm in identities:
            args += [str(rpm or 0).encode(), str(tpm or 0).encode()]
        try:
            reply = await self._eval("admit", keys, args)
        except StoreError as exc:
            self._down(exc)
            return None
        if not isinstance(reply, list) or len(reply) != 3:
            self._down(f"unexpected answer {reply!r:.60}")
            return None
        ok, a, b = (int(x) if isinstance(x, int) else 0 for x in reply)
        if ok:
            return Verdict(True, reservation=(a, b))
        return Verdict(False, "tpm" if a % 2 else "rpm", b, whose=a // 2)

    async def _eval(self, name: str, keys: list[bytes], args: list[bytes]) -> object:
        assert self.conn is not None
        head = [str(len(keys)).encode(), *keys, *args]
        reply = await self._wait(self.conn.call(b"EVALSHA", self.sha[name], *head))
        if isinstance(reply, StoreError) and str(reply).startswith("NOSCRIPT"):
            body = ADMIT if name == "admit" else SETTLE
            reply = await self._wait(self.conn.call(b"EVAL", body.encode(), *head))
        return self._check(reply)

    def settle(self, names: list[str], reservation: tuple[int, int], used: int) -> None:
        """Replace the reserved tokens by the used ones (sent, not awaited)."""
        second, reserved = reservation
        if used == reserved or self.conn is None or self.conn.closed:
            return
        keys = [(PREFIX + name).encode() for name in names]
        future = self.conn.call(b"EVALSHA", self.sha["settle"], str(len(keys)).encode(),
                                *keys, str(second).encode(), str(used - reserved).encode())
        future.add_done_callback(_ignore)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _expire(future: asyncio.Future[object], timeout: float) -> None:
    if not future.done():
        future.set_exception(StoreError(f"no answer within {timeout:g} s"))


def _ignore(future: asyncio.Future[object]) -> None:
    with contextlib.suppress(BaseException):
        future.result()
