"""The client-facing HTTP/1.1 server: an asyncio protocol around httptools' request parser.

Requests on one connection are answered in order; a request body is buffered (bounded by
`max_body_bytes`) unless the app asks to stream it (uploads), then it is handed over in
pieces through `BodyStream` with backpressure.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import cast

import httptools

INTERESTING = frozenset({
    b"authorization", b"content-type", b"content-length", b"expect", b"transfer-encoding",
})
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
BODY_HIGH_WATER = 1 << 20


class BodyStream:
    """A request body read in pieces as it arrives; pauses the client when behind."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.ended = False
        self.waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > BODY_HIGH_WATER:
            self.conn.pause_reading()
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read(self) -> bytes | None:
        """The next piece, or None at the end."""
        while not self.chunks:
            if self.ended or self.conn.closed:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        data = self.chunks.popleft()
        self.size -= len(data)
        if self.size <= BODY_HIGH_WATER // 2:
            self.conn.resume_reading()
        return data


class Request:
    """One parsed request."""

    __slots__ = ("body", "headers", "keep_alive", "method", "size", "started", "stream",
                 "too_large", "url")

    def __init__(self) -> None:
        self.url = b""
        self.method = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.too_large = False
        self.keep_alive = True
        self.stream: BodyStream | None = None
        self.started = 0.0

    @property
    def path(self) -> bytes:
        return self.url.split(b"?", 1)[0]


Handler = Callable[["ClientConnection", Request], Awaitable[None]]


class ClientConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, handler: Handler, streams_body: Callable[[bytes], bool],
                 max_body: Callable[[], int], extra_header: bytes,
                 connections: set[ClientConnection]) -> None:
        self.handler = handler
        self.streams_body = streams_body
        self.max_body = max_body
        self.extra_header = extra_header.lower()
        self.connections = connections
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.req: Request | None = None
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.paused_reading = False
        self.on_pause: Callable[[bool], None] | None = None
        """Set while relaying: called with True/False when the client's buffer fills/drains."""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.simple(400, b"upgrade is not supported", close=True)
        except httptools.HttpParserError:
            self.simple(400, b"malformed HTTP request", close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.connections.discard(self)
        if self.req is not None and self.req.stream is not None:
            self.req.stream.end()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(True)

    def resume_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(False)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.req = Request()

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.req is not None
        lname = name.lower()
        if lname in INTERESTING or lname == self.extra_header:
            self.req.headers[lname] = value

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        req.method = self.parser.get_method()
        req.keep_alive = self.parser.should_keep_alive()
        length = req.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body():
            req.too_large = True
        elif req.headers.get(b"expect", b"").lower() == b"100-continue":
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not req.too_large and self.streams_body(req.path):
            req.stream = BodyStream(self)
            self._dispatch(req)

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        if req.too_large:
            return
        if req.stream is not None:
            req.stream.feed(body)
            return
        req.size += len(body)
        if req.size > self.max_body():
            req.too_large, req.body = True, []
        else:
            req.body.append(body)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        if req.stream is not None:
            req.stream.end()
        else:
            self._dispatch(req)

    # dispatch

    def _dispatch(self, req: Request) -> None:
        req.started = time.monotonic()
        if self.task is None:
            self.task = self.loop.create_task(self._run(req))
        else:
            self.queue.append(req)

    async def _run(self, req: Request) -> None:
        while True:
            try:
                await self.handler(self, req)
            except asyncio.CancelledError:
                return
            if not req.keep_alive or self.closed:
                self.close()
                return
            if not self.queue:
                self.task = None
                return
            req = self.queue.popleft()

    # writing

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def respond(self, status: int, body: bytes, content_type: bytes = b"application/json",
                headers: bytes = b"", keep_alive: bool = True) -> None:
        """A whole response with Content-Length; `headers` are extra `Name: value\\r\\n` lines."""
        conn = b"" if keep_alive else b"Connection: close\r\n"
        self.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
            status, _REASONS.get(status, b"Unknown"), content_type, len(body), headers, conn,
            body))

    def start_chunked(self, status: int, content_type: bytes, headers: bytes = b"") -> None:
        self.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n"
                   b"Cache-Control: no-cache\r\n%s\r\n" % (
                       status, _REASONS.get(status, b"Unknown"), content_type, headers))

    def chunk(self, data: bytes) -> None:
        if data:
            self.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        self.write(b"0\r\n\r\n")

    def simple(self, status: int, message: bytes, close: bool = False) -> None:
        self.respond(status, message, b"text/plain", keep_alive=not close)
        if close:
            self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def pause_reading(self) -> None:
        if not self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = False
            self.transport.resume_reading()
