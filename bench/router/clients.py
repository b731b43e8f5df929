"""The upstream client alone: aiohttp, httpx and the router's raw protocol pool.

    python bench/router/clients.py --client {aiohttp,httpx,raw} --port PORT [--conns 32]
                                   [--seconds 5]

`--conns` tasks each send keep-alive `POST /v1/chat/completions` requests to a canned
upstream as fast as it answers, through one shared client (aiohttp `ClientSession` with a
`TCPConnector(limit=conns)`, `httpx.AsyncClient` with `Limits(conns, conns)`, or
`router.upstream.Pool` used the way the router uses it). Runs on uvloop. Prints one JSON
line: {"client", "requests", "seconds", "rps", "p50_ms", "p99_ms"}. Driven by run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
PATH = "/v1/chat/completions"
Send = Callable[[], Awaitable[int]]


async def with_aiohttp(url: str, conns: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns))
    headers = {"Content-Type": "application/json", "Authorization": "Bearer inst"}

    async def send() -> int:
        async with session.post(url, data=CHAT, headers=headers) as resp:
            return len(await resp.read())

    return send, session.close


async def with_httpx(url: str, conns: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import httpx

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=conns,
                                                   max_keepalive_connections=conns))
    headers = {"Content-Type": "application/json", "Authorization": "Bearer inst"}

    async def send() -> int:
        resp = await client.post(url, content=CHAT, headers=headers)
        return len(resp.content)

    return send, client.aclose


async def with_raw(url: str, conns: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    from router.upstream import Exchange, Pool, request_head

    loop = asyncio.get_running_loop()
    pool = Pool(url.removesuffix(PATH), loop)
    head = request_head(b"POST", PATH.encode(), pool, b"inst", b"application/json", len(CHAT))

    async def send() -> int:
        conn = pool.take_idle()
        if conn is None:
            conn = await pool.connect(5.0)
        ex = Exchange(loop)
        conn.send(ex, head + CHAT)
        await ex.done
        return len(ex.body())

    async def close() -> None:
        pool.close()

    return send, close


CLIENTS = {"aiohttp": with_aiohttp, "httpx": with_httpx, "raw": with_raw}


async def run(client: str, port: int, conns: int, seconds: float) -> dict[str, object]:
    send, close = await CLIENTS[client](f"http://127.0.0.1:{port}{PATH}", conns)
    for _ in range(conns * 4):  # warm up: open the connections
        await send()
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            size = await send()
            assert size > 0
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    took = time.perf_counter() - started
    await close()
    latencies.sort()
    return {"client": client, "requests": len(latencies), "seconds": round(took, 3),
            "rps": len(latencies) / took,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", choices=sorted(CLIENTS), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(run(args.client, args.port, args.conns, args.seconds))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
