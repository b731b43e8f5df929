"""The upstream HTTP/1.1 client: pooled keep-alive connections to one replica each.

Raw asyncio protocol with httptools' response parser, measured faster than aiohttp and
httpx for this job (docs/benchmarks/router.md). An `Exchange` is one request/response;
its body is either collected (`chunks`) or, once the caller attaches a `sink`, handed
straight to it from `data_received` without a task switch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

import httptools


class UpstreamError(Exception):
    """The replica failed before or during the response (connect, reset, timeout, parse)."""


class Exchange:
    """One request/response on an upstream connection."""

    __slots__ = (
        "chunks", "conn", "content_type", "done", "first", "got_bytes", "last_data",
        "retry_after", "sink", "status",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.content_type = b""
        self.retry_after = b""
        self.chunks: list[bytes] = []
        self.sink: Callable[[bytes | None, BaseException | None], None] | None = None
        self.first: asyncio.Future[None] = loop.create_future()
        """Resolved at the first body chunk, the end, or an error: when failover is decided."""
        self.done: asyncio.Future[None] = loop.create_future()
        self.got_bytes = False
        self.last_data = 0.0
        self.conn: UpstreamConnection | None = None

    def body(self) -> bytes:
        return b"".join(self.chunks)

    def _fail(self, exc: BaseException) -> None:
        if not self.first.done():
            self.first.set_exception(exc)
            self.first.exception()  # mark retrieved: the caller may only await `done`
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()
        if self.sink is not None:
            sink, self.sink = self.sink, None
            sink(None, exc)

    async def wait(self, fut: asyncio.Future[None], timeout: float, idle: bool) -> None:
        """Wait for `fut` (`first` or `done`); a deadline aborts the exchange with an
        UpstreamError: `timeout` seconds from now, or with `idle`, since the last byte."""
        if fut.done():
            fut.result()
            return
        loop = fut.get_loop()
        handles: list[asyncio.TimerHandle] = []

        def check() -> None:
            if fut.done():
                return
            if idle:
                left = self.last_data + timeout - time.monotonic()
                if left > 0:
                    handles[0] = loop.call_later(left, check)
                    return
            self.abort()
            self._fail(UpstreamError("upstream timed out"))

        handles.append(loop.call_later(timeout, check))
        try:
            await fut
        finally:
            handles[0].cancel()
            if not fut.done():  # cancelled by a client disconnect
                self.abort()

    def abort(self) -> None:
        """Give up on this exchange (client gone, timeout): the connection is not reusable."""
        conn = self.conn
        if conn is not None and conn.exchange is self:
            conn.exchange = None
            conn.close()


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive connection to one replica; one exchange at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.closed = False
        self.reused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(UpstreamError(f"bad response from {self.pool.url}: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(UpstreamError(f"{self.pool.url} closed the connection"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.exchange
        if ex is None:
            return
        lname = name.lower()
        if lname == b"content-type":
            ex.content_type = value
        elif lname == b"retry-after":
            ex.retry_after = value

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is None:
            return
        ex.got_bytes = True
        ex.last_data = time.monotonic()
        if ex.sink is not None:
            ex.sink(body, None)
            return
        ex.chunks.append(body)
        if not ex.first.done():
            ex.first.set_result(None)

    def on_message_complete(self) -> None:
        ex, self.exchange = self.exchange, None
        keep = self.parser.should_keep_alive()
        if keep and not self.closed:
            self.reused = True
            self.pool.release(self)
        else:
            self.close()
        if ex is None:
            return
        ex.conn = None
        if not ex.first.done():
            ex.first.set_result(None)
        if not ex.done.done():
            ex.done.set_result(None)
        if ex.sink is not None:
            sink, ex.sink = ex.sink, None
            sink(None, None)

    # ours

    def send(self, exchange: Exchange, data: bytes) -> None:
        self.exchange = exchange
        exchange.conn = self
        exchange.last_data = time.monotonic()
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def _lost(self, exc: BaseException) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.close()
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.conn = None
            ex._fail(exc)

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()


class Pool:
    """Idle keep-alive connections to one replica URL (`http://host:port`)."""

    MAX_IDLE = 256

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.url = url.rstrip("/")
        host, _, port = self.url.removeprefix("http://").rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.host_header = self.url.removeprefix("http://").encode()
        self.loop = loop
        self.idle: list[UpstreamConnection] = []
        self.retired = False

    async def connect(self, timeout: float) -> UpstreamConnection:
        """A fresh connection; UpstreamError when it cannot be made in `timeout` seconds."""
        try:
            _, proto = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
                timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.url}: {exc or 'timeout'}") from exc
        return proto

    def take_idle(self) -> UpstreamConnection | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        if len(self.idle) < self.MAX_IDLE and not self.retired:
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def retire(self) -> None:
        """The replica left the config: close idle connections, and busy ones when done."""
        self.retired = True
        self.close()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def request_head(method: bytes, path: bytes, pool: Pool, api_key: bytes | None,
                 content_type: bytes, length: int | None) -> bytes:
    """The request line and headers; `length` None means a chunked body."""
    parts = [method, b" ", path, b" HTTP/1.1\r\nHost: ", pool.host_header, b"\r\n"]
    if api_key:
        parts += [b"Authorization: Bearer ", api_key, b"\r\n"]
    if content_type:
        parts += [b"Content-Type: ", content_type, b"\r\n"]
    if length is None:
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
    else:
        parts += [b"Content-Length: ", str(length).encode(), b"\r\n\r\n"]
    return b"".join(parts)
