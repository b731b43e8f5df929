"""Health probes of backends: an HTTP GET that must answer 200, or a TCP connect."""

from __future__ import annotations

import asyncio
import contextlib

from agent.commands import Health


async def _http_ok(host: str, port: int, path: str, api_key: str | None) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}Connection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        status = await reader.readline()
        parts = status.split()
        return len(parts) >= 2 and parts[1] == b"200"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _tcp_ok(host: str, port: int) -> bool:
    _reader, writer = await asyncio.open_connection(host, port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def probe(check: Health, host: str, port: int, api_key: str | None,
                timeout: float = 3.0) -> bool:
    """True when the backend answers its health check within `timeout` seconds."""
    if check.kind == "process":
        return True
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    try:
        if check.kind == "tcp":
            return await asyncio.wait_for(_tcp_ok(connect_host, port), timeout)
        return await asyncio.wait_for(_http_ok(connect_host, port, check.path, api_key), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
