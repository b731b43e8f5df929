"""Forwarding a request to one of its model's replicas, failing over to another until the
first byte of an answer arrives.

A connect error, timeout, 5xx or 429 before that byte is retried on another replica (up
to `retries` times); when every replica answered 5xx or 429 the last answer is passed
on. A held (`buffer`) response is awaited whole, so a replica dying mid-response is
retried too; a relayed one (`sse`, `raw`) is committed at its first byte.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from random import Random

from router.balance import Homes, Load, choose, in_turn
from router.config import RouterConfig
from router.context import Context
from router.errors import ApiError
from router.metrics import Metrics
from router.multipart import Upload
from router.relay import Mode, relay
from router.replicas import ReplicaState
from router.server import ClientConnection, Request
from router.upstream import Exchange, UpstreamError, request_head

UPSTREAM_PATHS = {b"/v2/rerank": b"/v1/rerank"}
"""Paths a replica is asked on another path: Cohere's v2 rerank request is the same as the
v1 (Jina) one, which every rerank backend serves (llama-server has no /v2/rerank)."""

log = logging.getLogger("stack-router")


class Forwarder:
    """Sends requests to replicas: picks one, fails over, answers or relays."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rng: Random, metrics: Metrics,
                 replicas: Callable[[str], Sequence[ReplicaState]],
                 round_robin: Callable[[], bool]) -> None:
        self.loop = loop
        self.round_robin = round_robin
        """Whether the config loaded now says `balancing = "round-robin"`."""
        self.rng = rng
        self.metrics = metrics
        self.replicas = replicas
        """A model's replicas in the config loaded now: a retry after a reload picks
        among the new ones."""
        self.homes: Homes = Homes()
        """Prefix keys -> the replica that took each first (`balancing = "prefix"`)."""

    def pick(self, model: str, tried: list[ReplicaState], affinity: str | None,
             learned: bool = False) -> ReplicaState | None:
        """An available replica of `model` not tried yet, by the balancing rules."""
        now = time.monotonic()
        candidates = [r for r in self.replicas(model)
                      if r not in tried and r.health.available(now)]
        if len(candidates) == 1:
            return candidates[0]
        if affinity is None and self.round_robin():
            turns = [r.turn for r in candidates]
            chosen = candidates[in_turn([r.config.weight for r in candidates], turns)]
            for r, turn in zip(candidates, turns, strict=True):
                r.turn = turn
            return chosen
        index = choose([Load(r.config.id, r.in_flight(), r.config.weight, r.latency)
                        for r in candidates], self.rng, affinity,
                       self.homes if learned else None)
        return None if index is None else candidates[index]

    async def forward(self, conn: ClientConnection, ctx: Context, model: str,
                      body: bytes | Upload, mode: Mode, affinity: str | None,
                      learned: bool = False) -> None:
        """Answer the request from a replica of `model`, or raise a 503."""
        tried: list[ReplicaState] = []
        last: Exchange | None = None
        for attempt in range(ctx.tables.config.retries + 1):
            replica = self.pick(model, tried, affinity, learned)
            if replica is None:
                break
            if attempt:
                self.metrics.retried(model)
                if isinstance(body, Upload) and body.consumed:
                    break
            tried.append(replica)
            refused = await self._attempt(conn, ctx, replica, body, mode)
            if ctx.sent:
                return
            if refused is not None:
                last = refused
        if last is not None:
            ctx.overhead_base = 0.0
            extra = b"Retry-After: %s\r\n" % last.retry_after if last.retry_after else b""
            ctx.respond(conn, last.status, last.body(), last.content_type or b"application/json",
                        extra)
            return
        raise ApiError(503, f"no healthy replica of the model `{model}` answered",
                       "server_error", "no_healthy_replica")

    async def _attempt(self, conn: ClientConnection, ctx: Context, replica: ReplicaState,
                       body: bytes | Upload, mode: Mode) -> Exchange | None:
        """One try on `replica`. The client has its answer when `ctx.sent`; else this
        returns the replica's 5xx or 429 answer, or None when the replica failed."""
        config = ctx.tables.config
        replica.health.picked()
        replica.started()
        sent = time.monotonic()
        try:
            ex = await self._send(replica, ctx.req, body, config)
            if ex.status >= 500 or ex.status == 429:
                await ex.wait(ex.done, config.timeouts.idle, idle=True)
                if ex.status >= 500:
                    replica.failed(self.metrics)
                return ex
            if mode == "buffer" or ex.status >= 300:
                await ex.wait(ex.done, config.timeouts.idle, idle=True)
                replica.answered(sent)
                ctx.overhead_base = ex.last_data - sent
                result = ex.body()
                content_type = ex.content_type or b"application/json"
                if ex.status < 300:
                    ctx.usage.count(result)
                    made = ctx.render(result) if ctx.render is not None else None
                    if made is not None:
                        result, content_type = made
                if ctx.alias:
                    result = ctx.named_as_asked(result)
                ctx.respond(conn, ex.status, result, content_type)
                return None
            replica.answered(sent)
            if ctx.model is not None:
                self.metrics.first_token(ctx.model, replica.config.id,
                                         time.monotonic() - ctx.req.started)
            await relay(conn, ctx, ex, mode, sent, config.timeouts.idle)
        except UpstreamError as exc:
            replica.failed(self.metrics)
            log.debug("router: %s replica %s failed: %s", replica.model, replica.config.id, exc)
        finally:
            replica.ended()
        return None

    async def _send(self, replica: ReplicaState, req: Request, body: bytes | Upload,
                    config: RouterConfig) -> Exchange:
        """Send the request; return once the first body byte (or the end) has arrived."""
        pool = replica.pool
        content_type = req.headers.get(b"content-type", b"application/json")
        path = UPSTREAM_PATHS.get(req.url, req.url)
        for _ in range(2):
            upstream = pool.take_idle()
            fresh = upstream is None
            if upstream is None:
                upstream = await pool.connect(config.timeouts.connect)
            ex = Exchange(self.loop)
            if isinstance(body, Upload):
                upstream.send(ex, request_head(req.method, path, pool, replica.api_key,
                                               content_type, body.length))
                await body.send(upstream)
            else:
                upstream.send(ex, request_head(req.method, path, pool, replica.api_key,
                                               content_type, len(body)) + body)
            try:
                await ex.wait(ex.first, config.timeouts.first_byte, idle=False)
                return ex
            except UpstreamError:
                # a reused keep-alive connection the replica closed meanwhile: try a fresh one
                if fresh or ex.got_bytes or ex.status or isinstance(body, Upload):
                    raise
        raise UpstreamError(f"{pool.url} keeps closing connections")
