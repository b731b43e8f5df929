"""HTTP to backends: health probes (a GET that must answer 200, or a TCP connect) and the
bounded GET that reads a backend's metrics page."""

from __future__ import annotations

import asyncio
import contextlib

from agent.commands import Health


class ResponseTooLarge(Exception):
    """A backend's answer is longer than the reader's limit."""


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


async def _send_get(host: str, port: int, path: str, api_key: str | None, version: str
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    writer.write(f"GET {path} HTTP/{version}\r\nHost: {host}:{port}\r\n{auth}"
                 "Connection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _http_ok(host: str, port: int, path: str, api_key: str | None) -> bool:
    reader, writer = await _send_get(host, port, path, api_key, "1.1")
    try:
        parts = (await reader.readline()).split()
        return len(parts) >= 2 and parts[1] == b"200"
    finally:
        await _close(writer)


async def _tcp_ok(host: str, port: int) -> bool:
    _reader, writer = await asyncio.open_connection(host, port)
    await _close(writer)
    return True


async def probe(check: Health, host: str, port: int, api_key: str | None,
                timeout: float = 3.0) -> bool:
    """True when the backend answers its health check within `timeout` seconds."""
    if check.kind == "process":
        return True
    try:
        if check.kind == "tcp":
            return await asyncio.wait_for(_tcp_ok(_reachable(host), port), timeout)
        return await asyncio.wait_for(_http_ok(_reachable(host), port, check.path, api_key),
                                      timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False


async def _read_all(host: str, port: int, path: str, api_key: str | None,
                    limit: int) -> tuple[int, bytes]:
    reader, writer = await _send_get(host, port, path, api_key, "1.0")
    try:
        data = bytearray()
        while chunk := await reader.read(65536):
            data += chunk
            if len(data) > limit + 16384:  # the head is allowed 16 KiB beside the body
                raise ResponseTooLarge(f"the answer is longer than {limit} bytes")
    finally:
        await _close(writer)
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError("not an HTTP response")
    if len(body) > limit:
        raise ResponseTooLarge(f"the answer is longer than {limit} bytes")
    return int(parts[1]), body


async def get(host: str, port: int, path: str, api_key: str | None, *, limit: int,
              timeout: float) -> tuple[int, bytes]:
    """The status and body of a GET to a backend, whole within `timeout` seconds and
    `limit` bytes of body. HTTP/1.0, so the body is never chunked: it ends with the
    connection. Raises OSError, TimeoutError, ResponseTooLarge or ValueError."""
    return await asyncio.wait_for(_read_all(_reachable(host), port, path, api_key, limit),
                                  timeout)
