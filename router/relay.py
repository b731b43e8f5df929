"""Relaying a replica's response to the client as it arrives, once its first byte is in:
whole SSE events (counting their token usage), or raw bytes (audio).

The client's backpressure pauses the upstream connection; a replica that fails or stalls
mid-stream ends the stream with an error event and closes the client connection, so a
client never hangs.
"""

from __future__ import annotations

import time
from typing import Literal

from router.context import Context
from router.server import ClientConnection
from router.upstream import Exchange, UpstreamConnection, UpstreamError
from router.usage import has_usage, take_usage

Mode = Literal["buffer", "sse", "raw"]
"""How a response reaches the client: held whole, relayed by SSE event, relayed raw."""

MID_STREAM_ERROR = (b'data: {"error":{"message":"the model replica failed mid-stream",'
                    b'"type":"server_error","param":null,"code":"upstream_error"}}\n\n')


class SseRelay:
    """Passes SSE events through whole, reading usage, dropping the usage-only chunk the
    router asked for when the client did not, and naming the model as the client did."""

    def __init__(self, conn: ClientConnection, ctx: Context) -> None:
        self.conn = conn
        self.usage = ctx.usage
        self.ctx = ctx if ctx.alias else None
        self.buf = b""

    def feed(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
        cut = data.rfind(b"\n\n")
        crlf = data.rfind(b"\r\n\r\n")
        if crlf >= 0 and crlf + 2 > cut:
            cut = crlf + 2
        if cut < 0:
            self.buf = data
            return
        complete, self.buf = data[:cut + 2], data[cut + 2:]
        self._send(complete)

    def flush(self) -> None:
        if self.buf:
            rest, self.buf = self.buf, b""
            self._send(rest)

    def _send(self, events: bytes) -> None:
        if has_usage(events):
            events = take_usage(events, self.usage)
        if self.ctx is not None:
            events = self.ctx.named_as_asked(events)
        self.conn.chunk(events)


async def relay(conn: ClientConnection, ctx: Context, ex: Exchange, mode: Mode, sent: float,
                idle: float) -> None:
    """Send the status now and every chunk as it comes; end with an error event on failure."""
    content_type = ex.content_type or (b"text/event-stream" if mode == "sse"
                                       else b"application/octet-stream")
    ctx.overhead_base = ex.last_data - sent
    conn.start_chunked(ex.status, content_type, ctx.overhead_header(time.monotonic()))
    ctx.sent = True
    ctx.status = ex.status
    sse = SseRelay(conn, ctx) if mode == "sse" else None
    for piece in ex.chunks:
        if sse is not None:
            sse.feed(piece)
        else:
            conn.chunk(piece)
    ex.chunks = []
    failed = await _follow(conn, ex, sse, idle)
    if sse is not None:
        sse.flush()
    if failed:
        if sse is not None:
            conn.chunk(MID_STREAM_ERROR)
        conn.end_chunked()
        conn.close()
        return
    conn.end_chunked()


async def _follow(conn: ClientConnection, ex: Exchange, sse: SseRelay | None,
                  idle: float) -> bool:
    """Pass the rest of the body on as it arrives; True when the replica failed."""
    if ex.done.done():
        return ex.done.exception() is not None
    upstream: UpstreamConnection | None = ex.conn
    failure: list[BaseException] = []

    def sink(data: bytes | None, exc: BaseException | None) -> None:
        if data is not None:
            if sse is not None:
                sse.feed(data)
            else:
                conn.chunk(data)
        elif exc is not None:
            failure.append(exc)

    def on_pause(paused: bool) -> None:
        if upstream is not None:
            upstream.pause() if paused else upstream.resume()

    ex.sink = sink
    conn.on_pause = on_pause
    try:
        await ex.wait(ex.done, idle, idle=True)
    except UpstreamError as exc:
        failure.append(exc)
    finally:
        conn.on_pause = None
        ex.sink = None
    return bool(failure)
