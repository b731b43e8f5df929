"""Multipart uploads (`/v1/audio/transcriptions`): the head of the body is read until the
`model` field is complete, then the rest is streamed upstream without buffering it.
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


def find_field(head: bytes, boundary: bytes, name: bytes) -> bytes | None:
    """The value of form field `name` if `head` holds it whole, else None (read more)."""
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
            return head[end_headers + 4:value_end] if value_end >= 0 else None
        if value_end < 0:
            return None
        pos = value_end + 2
    return None


class Upload:
    """A multipart body: the head read to find `model`, then the rest streamed."""

    def __init__(self, head: bytes, stream: BodyStream, length: int | None) -> None:
        self.head = head
        self.stream = stream
        self.length = length
        self.consumed = False
        """Sending started: the body cannot be sent to another replica."""

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
    while model is None:
        piece = await stream.read()
        if piece is None:
            break
        head.append(piece)
        size += len(piece)
        if size > max_bytes:
            req.keep_alive = False
            raise ApiError(413, f"the upload has no `model` field within the router's "
                           f"`max_body_bytes` ({max_bytes} bytes); put `model` before the file",
                           "invalid_request_error", "request_too_large")
        model = find_field(b"".join(head), found, b"model")
    length = req.headers.get(b"content-length")
    upload = Upload(b"".join(head), stream,
                    int(length) if length is not None and length.isdigit() else None)
    return upload, model
