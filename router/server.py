"""The client-facing HTTP/1.1 server: an asyncio protocol around httptools' request parser.

Requests on one connection are answered in order; a request body is buffered (bounded by
`max_body_bytes`) unless the app asks to stream it (uploads), then it is handed over in
pieces through `BodyStream` with backpressure.

A client gets no more of the worker than `clients` in router.json allows (docs/router.md):
its head is bounded in bytes, lines and URL length (431, 414), a body declared too big is
refused when its head ends (413), and a connection whose answers go unread stops being
read (backpressure) until they drain. Deadlines are kept on the connection and enforced
by `router.guard`. A refused request is answered in order, in OpenAI's error shape, and
the connection is closed after a short linger, so the client can read the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import cast

import httptools

from router.errors import ApiError
from router.guard import Guard

INTERESTING = frozenset({
    b"authorization", b"content-type", b"content-length", b"expect", b"transfer-encoding",
})
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
BODY_HIGH_WATER = 1 << 20
WRITE_HIGH_WATER = 1 << 16
"""Unsent answer bytes past which the connection stops being read."""
PIPELINE_DEPTH = 32
"""Parsed requests waiting their turn past which the connection stops being read."""
LINGER = 2.0
"""Seconds a refused connection is still read (and discarded) after its answer, so the
client is not reset before it reads it."""
INF = float("inf")
KEEPALIVE = -1.0
"""`ClientConnection.deadline` of a connection that went idle after an answer: the guard's
next sweep sets it to the keep-alive timeout from then (so an answer reads no clock)."""

# reasons the connection is not read (bits of `ClientConnection.holds`)
BODY, WRITE, QUEUE, REFUSED = 1, 2, 4, 8
# what a connection waits for (`ClientConnection.phase`), which says what its deadline is
IDLE, HEAD, BODY_PHASE = 0, 1, 2


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
            self.conn.hold(BODY)
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
            self.conn.release(BODY)
        return data


class Request:
    """One parsed request."""

    __slots__ = ("body", "headers", "keep_alive", "method", "refusal", "repeated", "size",
                 "started", "stream", "url")

    def __init__(self) -> None:
        self.url = b""
        self.method = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.refusal: ApiError | None = None
        """Why the request is refused before it reaches the app (the server's limits)."""
        self.repeated: bytes | None = None
        """A header the app reads that came more than once (ambiguous: refused)."""
        self.keep_alive = True
        self.stream: BodyStream | None = None
        self.started = 0.0

    @property
    def path(self) -> bytes:
        return self.url.split(b"?", 1)[0]


Handler = Callable[["ClientConnection", Request], Awaitable[None]]


def refusal(status: int, message: str, code: str) -> ApiError:
    """A request the server refuses for the client's fault (`invalid_request_error`)."""
    return ApiError(status, message, "invalid_request_error", code)


class ClientConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, handler: Handler, streams_body: Callable[[bytes], bool],
                 max_body: Callable[[], int], extra_header: bytes, guard: Guard) -> None:
        self.handler = handler
        self.streams_body = streams_body
        self.max_body = max_body
        self.extra_header = extra_header.lower()
        self.guard = guard
        self.clients = guard.limits
        """The limits when the connection came (a reload applies to new connections)."""
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.req: Request | None = None
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.lingering = False
        self.holds = 0
        """Why the connection is not read now (BODY, WRITE, QUEUE, REFUSED bits)."""
        self.phase = IDLE
        self.deadline = INF
        """When the phase's timeout runs out (loop time); `router.guard` enforces it."""
        self.heads = 0
        self.head_reported = 0
        """Bytes of the current head seen in parser callbacks (URL, header lines)."""
        self.head_carried = 0
        """Bytes of the current head in reads that held nothing else: counts a header the
        parser is still collecting, which no callback has reported yet."""
        self.header_count = 0
        self.counting = False
        """The current read is larger than `max_header_bytes`: count the head's bytes."""
        self.write_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.stalled_at = 0.0
        self.stalled_size = 0
        self.on_pause: Callable[[bool], None] | None = None
        """Set while relaying: called with True/False when the client's buffer fills/drains."""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        if not self.guard.admit(self):
            self._turn_away()
            return
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER)
        self.deadline = self.loop.time() + self.clients.header_timeout

    def _turn_away(self) -> None:
        """Answer a connection over the cap at once, without reading it."""
        err = ApiError(503, f"the router holds its `clients.max_connections` limit of "
                       f"{self.guard.limit} connections per worker; retry in a moment",
                       "server_error", "too_many_connections")
        self.respond(503, err.body(), headers=b"Retry-After: 1\r\n", keep_alive=False)
        self.close()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # refused, or closing after its last answer: what follows is discarded
        # a head that begins and ends in a read no larger than the limit is under it: bytes
        # are counted only in larger reads and in the reads after a head's first one (its
        # part in that first read is not, so a head spread over reads may pass the limit
        # by up to one read)
        if self.phase == HEAD:
            heads = self.heads
            self.counting = True
        else:
            heads = -1
            self.counting = len(data) > self.clients.max_header_bytes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._refuse(cause if isinstance(cause, ApiError) else refusal(
                400, "malformed HTTP request", "malformed_request"))
            return
        except httptools.HttpParserUpgrade:
            self._refuse(refusal(400, "protocol upgrades are not supported",
                                 "upgrade_not_supported"))
            return
        except httptools.HttpParserError as exc:
            self._refuse(refusal(400, f"malformed HTTP request: {exc}", "malformed_request"))
            return
        if self.phase:  # the read ended inside a request (IDLE is 0): a deadline to set
            self._read_ended_inside(heads, len(data))

    def _read_ended_inside(self, heads: int, size: int) -> None:
        """Set the deadline of a request the read ended in, once per read; check its head."""
        if self.phase == HEAD:
            if self.heads == heads:
                self.head_carried += size
            else:  # the head began in this read: its time starts now
                self.deadline = self.loop.time() + self.clients.header_timeout
            problem = self._head_problem()
            if problem is not None:
                self._refuse(problem)
        else:
            self.deadline = self.loop.time() + self.clients.body_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.guard.connections.discard(self)
        if self.req is not None and self.req.stream is not None:
            self.req.stream.end()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._wake_drained()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.stalled_at = self.loop.time()
        self.stalled_size = self.transport.get_write_buffer_size() if self.transport else 0
        self.hold(WRITE)
        if self.on_pause is not None:
            self.on_pause(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.release(WRITE)
        self._wake_drained()
        if self.on_pause is not None:
            self.on_pause(False)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.req = Request()
        self.phase, self.heads = HEAD, self.heads + 1
        self.head_reported = self.head_carried = self.header_count = 0

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.url += url
        if len(req.url) > self.clients.max_url_bytes:  # at once: the URL comes in pieces
            limit = self.clients.max_url_bytes
            raise refusal(414, f"the request URL is longer than the router's "
                          f"`clients.max_url_bytes` ({limit} bytes); send a shorter one",
                          "url_too_long")
        if self.counting:
            self.head_reported += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # counted here, checked once the read is parsed (`data_received`) or the head ends:
        # one read holds a bounded number of header lines
        self.header_count += 1
        if self.counting:
            self.head_reported += len(name) + len(value)
        lname = name.lower()
        if lname in INTERESTING or lname == self.extra_header:
            req = self.req
            assert req is not None
            if req.headers.setdefault(lname, value) is not value:  # the first one is kept
                req.repeated = lname

    def _head_problem(self) -> ApiError | None:
        """A 431 when the head being read is over the header limits."""
        clients = self.clients
        if self.header_count > clients.max_headers:
            return refusal(431, f"the request has more than the router's "
                           f"`clients.max_headers` ({clients.max_headers}) header lines; "
                           "send fewer", "headers_too_large")
        if max(self.head_reported, self.head_carried) > clients.max_header_bytes:
            return refusal(431, f"the request head is larger than the router's "
                           f"`clients.max_header_bytes` ({clients.max_header_bytes} bytes); "
                           "send smaller headers", "headers_too_large")
        return None

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        clients = self.clients
        if (self.header_count > clients.max_headers
                or self.head_reported > clients.max_header_bytes):
            raise cast(ApiError, self._head_problem())
        req.method = self.parser.get_method()
        req.keep_alive = self.parser.should_keep_alive()
        self.phase = BODY_PHASE
        length = req.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body():
            raise self._body_too_large()
        if req.headers.get(b"expect", b"").lower() == b"100-continue":
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.streams_body(req.path):
            req.stream = BodyStream(self)
            self._dispatch(req)

    def _body_too_large(self) -> ApiError:
        limit = self.max_body()
        return refusal(413, f"the request body is larger than the router's `max_body_bytes` "
                       f"({limit} bytes); send a smaller one", "request_too_large")

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        req.size += len(body)
        if req.stream is not None:
            if req.size > self.max_body():
                self.close()  # answering started upstream: the upload just ends
            req.stream.feed(body)
            return
        if req.size > self.max_body():
            raise self._body_too_large()
        req.body.append(body)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.phase, self.deadline = IDLE, INF
        if req.stream is not None:
            req.stream.end()
        else:
            self._dispatch(req)

    # dispatch

    def _refuse(self, err: ApiError) -> None:
        """Stop reading; answer `err` in this request's turn, then close."""
        self.hold(REFUSED)
        req = self.req if self.req is not None and self.phase != IDLE else Request()
        if req.stream is not None:  # the app has it already
            self.close()
            return
        req.refusal, req.keep_alive = err, False
        self.phase, self.deadline = IDLE, INF
        self._dispatch(req)

    def _dispatch(self, req: Request) -> None:
        req.started = time.monotonic()
        if self.task is None:
            self.task = self.loop.create_task(self._run(req))
            return
        self.queue.append(req)
        if len(self.queue) >= PIPELINE_DEPTH:
            self.hold(QUEUE)

    async def _run(self, req: Request) -> None:
        while True:
            try:
                await self.handler(self, req)
                if self.write_paused:
                    await self._drain()
            except asyncio.CancelledError:
                return
            if not req.keep_alive or self.closed:
                self.close()
                return
            if not self.queue:
                self.task = None
                if self.phase == IDLE:
                    self.deadline = KEEPALIVE  # the sweep makes it a time (router.guard)
                return
            req = self.queue.popleft()
            if len(self.queue) <= PIPELINE_DEPTH // 2:
                self.release(QUEUE)

    async def _drain(self) -> None:
        """Wait until the client reads enough of its answers (or goes)."""
        while self.write_paused and not self.closed:
            self.drained = self.loop.create_future()
            await self.drained

    def _wake_drained(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # deadlines (called by the guard's sweep)

    def expire(self) -> None:
        """The phase's deadline passed: a request cut short gets a 408, then the close."""
        if self.lingering:
            self.abort()
        elif self.phase != IDLE and self.task is None:
            clients = self.clients
            which, seconds = (("header_timeout", clients.header_timeout) if self.phase == HEAD
                              else ("body_timeout", clients.body_timeout))
            err = refusal(408, f"the request did not arrive within the router's "
                          f"`clients.{which}` ({seconds:g} s); send it faster", "timeout")
            self.respond(408, err.body(), keep_alive=False)
            self.close()
        else:
            self.abort()

    def check_send(self, now: float, timeout: float) -> None:
        """Writing is paused: abort when the client read nothing for `timeout` seconds."""
        if now - self.stalled_at < timeout or self.transport is None:
            return
        size = self.transport.get_write_buffer_size()
        if size < self.stalled_size:
            self.stalled_at, self.stalled_size = now, size
        else:
            self.abort()

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

    def close(self) -> None:
        """Close once the answers are sent; a refused client is first read a little longer
        (and ignored), so its unread request does not make the close a reset."""
        transport = self.transport
        if self.closed or transport is None:
            return
        self.closed = True
        if self.holds & REFUSED and transport.can_write_eof():
            self.lingering = True
            transport.write_eof()
            self.holds = 0
            transport.resume_reading()
            self.deadline = self.loop.time() + LINGER
            return
        transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent answers and all."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def hold(self, reason: int) -> None:
        """Stop reading the connection for `reason` (until `release`)."""
        if not self.holds and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.holds |= reason

    def release(self, reason: int) -> None:
        if not self.holds & reason:
            return
        self.holds &= ~reason
        if not self.holds and self.transport is not None and not self.closed:
            self.transport.resume_reading()
