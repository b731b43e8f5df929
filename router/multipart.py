"""Multipart uploads (`/v1/audio/transcriptions`, `/v1/audio/translations`,
`/v1/images/edits`): the head of the body is read until the `model` field is complete (and
`response_format`, or a file's part, is reached), then the rest is streamed upstream
without buffering it. Fields of the head may be rewritten before it goes (`Upload.set`).
"""

from __future__ import annotations

import asyncio
import re

from router.errors import ApiError, bad_request
from router.server import BodyStream, Request
from router.upstream import UpstreamConnection

_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)


def boundary(content_type: bytes) -> bytes | None:
    """The boundary parameter of a multipart content type."""
    match = _BOUNDARY.search(content_type)
    return match.group(1).strip() if match else None


def _field_span(head: bytes, boundary: bytes, name: bytes) -> tuple[int, int] | None:
    """Where the value of form field `name` is in `head`, if `head` holds it whole."""
    delimiter = b"--" + boundary
    pos = head.find(delimiter)
    while pos >= 0:
        start = pos + len(delimiter)
        if head[start:start + 2] == b"--":
            return None  # closing delimiter: the field is not there
        end_headers = head.find(b"\r\n\r\n", start)
        if end_headers < 0:
            return None
        part_headers = head[start:end_headers]
        value_end = head.find(b"\r\n" + delimiter, end_headers + 4)
        match = _NAME.search(part_headers)
        if match and match.group(1) == name:
            return (end_headers + 4, value_end) if value_end >= 0 else None
        if value_end < 0:
            return None
        pos = value_end + 2
    return None


def find_field(head: bytes, boundary: bytes, name: bytes) -> bytes | None:
    """The value of form field `name` if `head` holds it whole, else None (read more)."""
    span = _field_span(head, boundary, name)
    return head[span[0]:span[1]] if span is not None else None


def _settled(head: bytes, boundary: bytes) -> bool:
    """Whether `head` shows `response_format`, or reaches the file (or the end) first."""
    return (b'filename="' in head or b"--" + boundary + b"--" in head
            or _field_span(head, boundary, b"response_format") is not None)


class Upload:
    """A multipart body: the head read to find `model`, then the rest streamed."""

    def __init__(self, head: bytes, stream: BodyStream, length: int | None,
                 boundary: bytes) -> None:
        self.head = head
        self.stream = stream
        self.length = length
        self.boundary = boundary
        self.consumed = False
        """Sending started: the body cannot be sent to another replica."""

    def field(self, name: bytes) -> bytes | None:
        """The value of a form field of the head, if the head holds it."""
        return find_field(self.head, self.boundary, name)

    def set(self, name: bytes, value: bytes) -> None:
        """Give a field of the head (which holds it) another value; the length follows."""
        span = _field_span(self.head, self.boundary, name)
        assert span is not None
        self.head = self.head[:span[0]] + value + self.head[span[1]:]
        if self.length is not None:
            self.length += len(value) - (span[1] - span[0])

    async def send(self, conn: UpstreamConnection) -> None:
        """Write the head and the rest of the body (chunked when the length is unknown)."""
        transport = conn.transport
        assert transport is not None
        self.consumed = True
        chunked = self.length is None

        def put(data: bytes) -> None:
            transport.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

        put(self.head)
        while True:
            piece = await self.stream.read()
            if piece is None:
                break
            put(piece)
            if transport.get_write_buffer_size() > 1 << 20:
                while transport.get_write_buffer_size() > 1 << 19 and not conn.closed:
                    await asyncio.sleep(0.005)
        if chunked:
            transport.write(b"0\r\n\r\n")


async def read_upload(req: Request, max_bytes: int) -> tuple[Upload, bytes | None]:
    """The upload of `req` with its head read, and its `model` field (None if missing)."""
    stream = req.stream
    assert stream is not None
    found = boundary(req.headers.get(b"content-type", b""))
    if found is None:
        raise bad_request("the upload must be multipart/form-data")
    head: list[bytes] = []
    size, model = 0, None
    while model is None or not _settled(b"".join(head), found):
        piece = await stream.read()
        if piece is None:
            break
        head.append(piece)
        size += len(piece)
        if size > max_bytes and model is not None:
            break  # the model is known: the rest is streamed as it is
        if size > max_bytes:
            req.keep_alive = False
            raise ApiError(413, f"the upload has no `model` field within the router's "
                           f"`max_body_bytes` ({max_bytes} bytes); put `model` before the file",
                           "invalid_request_error", "request_too_large")
        model = find_field(b"".join(head), found, b"model")
    header = req.headers.get(b"content-length")
    length = int(header) if header is not None and header.isdigit() else None
    return Upload(b"".join(head), stream, length, found), model
