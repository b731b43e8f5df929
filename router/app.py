"""The router's request handling: endpoints, keys and limits, replica choice, failover,
streaming relay, token counting, metrics.

One `Router` per process. Its `Tables` (routes, keys, replicas) are rebuilt from the
config on reload; replicas and limiters that did not change carry over, so requests in
flight finish on the objects they started with.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from router import multipart
from router.balance import Load, choose
from router.config import Key, Replica, RouterConfig
from router.errors import ApiError, bad_request
from router.health import ReplicaHealth
from router.limits import KeyLimiter, Limiter
from router.metrics import Metrics, ReplicaGauge, combine
from router.server import ClientConnection, Request
from router.shared import SharedState
from router.upstream import Exchange, Pool, UpstreamConnection, UpstreamError, request_head

log = logging.getLogger("stack-router")

JSON_ENDPOINTS = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/embeddings": "embeddings",
    b"/v1/rerank": "rerank",
    b"/rerank": "rerank",
    b"/v1/audio/speech": "speech",
    b"/v1/images/generations": "images",
}
UPLOAD_ENDPOINTS = {b"/v1/audio/transcriptions": "transcriptions"}
STREAMABLE = {"chat", "completions"}
"""Endpoints whose `stream: true` means an SSE response with token usage to count."""
RAW_RELAY = {"speech"}
"""Endpoints whose (binary) response is relayed as it comes, without usage."""
OVERHEAD_HEADER = b"x-modelstack-overhead-ms"
DEFAULT_MAX_TOKENS = 256
"""Completion tokens reserved against `tpm` when the request does not say `max_tokens`."""
EWMA = 0.2


def hash_key(key: str) -> str:
    """The stored form of a key (same rule as `stack/secrets.py`)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class ReplicaState:
    """A replica and what this process knows about it."""

    __slots__ = ("api_key", "config", "health", "latency", "load", "model", "outstanding",
                 "pool", "slot")

    def __init__(self, model: str, config: Replica, config_all: RouterConfig,
                 loop: asyncio.AbstractEventLoop, shared: SharedState | None = None,
                 slot: int = 0) -> None:
        self.model = model
        self.config = config
        self.api_key = config.api_key.encode() if config.api_key else None
        self.pool = Pool(config.url, loop)
        self.health = ReplicaHealth(config_all.health.eject_after, config_all.health.backoff_max)
        self.outstanding = 0
        """Requests this process has in flight on the replica."""
        self.latency = 0.0
        self.slot = slot
        self.load: memoryview | None = None
        """With several workers: every worker's requests in flight on it (shared memory)."""
        if shared is not None:
            ident = hashlib.blake2b(f"{model}\0{config.id}\0{config.url}\0{config.api_key}"
                                    .encode(), digest_size=16).digest()
            self.load = shared.replica_load(ident, slot)

    def started(self) -> None:
        self.outstanding += 1
        if self.load is not None:
            self.load[self.slot] = self.outstanding

    def ended(self) -> None:
        self.outstanding -= 1
        if self.load is not None:
            self.load[self.slot] = self.outstanding

    def in_flight(self) -> int:
        """Requests in flight on the replica: of every worker when they share the count."""
        return self.outstanding if self.load is None else sum(self.load)

    def same(self, other: Replica) -> bool:
        return (self.config.url, self.config.api_key) == (other.url, other.api_key)


@dataclass(slots=True)
class KeyEntry:
    key: Key
    limiter: Limiter
    allowed: frozenset[str] | None
    """Resolved model names the key may use; None means all."""


@dataclass(slots=True)
class Tables:
    """Everything derived from one config."""

    config: RouterConfig
    routes: dict[str, str]
    """Model name or alias -> model name."""
    replicas: dict[str, list[ReplicaState]]
    keys: dict[str, KeyEntry]
    """Key hash -> entry."""
    models_body: dict[str, bytes]
    """Key name ("" without keys) -> the /v1/models response."""


def build_tables(config: RouterConfig, old: Tables | None, loop: asyncio.AbstractEventLoop,
                 shared: SharedState | None = None, slot: int = 0) -> Tables:
    """Tables for `config`, carrying over unchanged replicas and limiters from `old`.

    With `shared` (several workers; this one is `slot`) limiters count in shared memory by
    key hash, so their windows survive reloads and restarts of a worker whatever the limits
    are, and each replica's requests in flight are counted over all workers.
    """
    old_replicas = {(r.model, r.config.id): r for rs in (old.replicas.values() if old else [])
                    for r in rs}
    routes: dict[str, str] = {}
    replicas: dict[str, list[ReplicaState]] = {}
    for model in config.models:
        for name in (model.name, *model.aliases):
            routes[name] = model.name
        states = []
        for rep in model.replicas:
            prev = old_replicas.pop((model.name, rep.id), None)
            if prev is not None and prev.same(rep):
                prev.config = rep
                states.append(prev)
            else:
                states.append(ReplicaState(model.name, rep, config, loop, shared, slot))
        replicas[model.name] = states
    for gone in old_replicas.values():
        gone.pool.retire()
    old_keys = old.keys if old else {}
    keys: dict[str, KeyEntry] = {}
    for key in config.keys:
        prev_entry = old_keys.get(key.hash)
        limiter: Limiter | None = None
        if prev_entry and (prev_entry.key.rpm, prev_entry.key.tpm) == (key.rpm, key.tpm):
            limiter = prev_entry.limiter
        elif shared is not None and (key.rpm is not None or key.tpm is not None):
            limiter = shared.limiter(key.hash, key.rpm, key.tpm)
        if limiter is None:
            limiter = KeyLimiter(key.rpm, key.tpm)
        allowed = frozenset(routes[m] for m in key.models) if key.models else None
        keys[key.hash] = KeyEntry(key, limiter, allowed)
    bodies: dict[str, bytes] = {}
    for name, allowed_set in ([("", None)] if not config.keys
                              else [(e.key.name, e.allowed) for e in keys.values()]):
        data = [{"id": alias, "object": "model", "created": 0, "owned_by": "modelstack"}
                for alias, target in routes.items()
                if allowed_set is None or target in allowed_set]
        bodies[name] = orjson.dumps({"object": "list", "data": data})
    return Tables(config, routes, replicas, keys, bodies)


class Router:
    """The request handler of one process."""

    def __init__(self, config: RouterConfig, loop: asyncio.AbstractEventLoop,
                 seed: int | None = None, shared: SharedState | None = None,
                 slot: int = 0) -> None:
        self.loop = loop
        self.rng = random.Random(seed)
        self.metrics = Metrics()
        self.shared = shared
        self.slot = slot
        """This worker's number when `shared` (several workers)."""
        self.tables = build_tables(config, None, loop, shared, slot)
        self.key_cache: dict[bytes, KeyEntry | None] = {}
        self.inflight = 0

    def reload(self, config: RouterConfig) -> None:
        self.tables = build_tables(config, self.tables, self.loop, self.shared, self.slot)
        self.key_cache.clear()

    def gauges(self) -> list[ReplicaGauge]:
        return [ReplicaGauge(r.model, r.config.id, r.outstanding, r.health.state == "up")
                for rs in self.tables.replicas.values() for r in rs]

    def snapshot(self) -> bytes:
        """This worker's counters, for the sibling that answers `/metrics`."""
        return self.metrics.snapshot(self.gauges())

    async def render_metrics(self) -> bytes:
        """`/metrics`: this process's counters, plus its siblings' with several workers."""
        if self.shared is None:
            return self.metrics.render(self.gauges())
        peers = await self.shared.gather(self.slot)
        total = Metrics()
        gauges = total.merge(self.snapshot())
        for data in peers:
            gauges += total.merge(data)
        return total.render(combine(gauges), workers=1 + len(peers))

    # entry points used by the server

    def streams_body(self, path: bytes) -> bool:
        return path in UPLOAD_ENDPOINTS

    def max_body(self) -> int:
        return self.tables.config.max_body_bytes

    async def handle(self, conn: ClientConnection, req: Request) -> None:
        self.inflight += 1
        tables = self.tables
        ctx = _Context(req, tables)
        try:
            await self._handle(conn, req, ctx)
        except ApiError as err:
            if not ctx.sent:
                extra = b"Retry-After: %d\r\n" % err.retry_after if err.retry_after else b""
                self._respond(conn, ctx, err.status, err.body(), b"application/json", extra)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("router: unexpected error on %s", req.path.decode(errors="replace"))
            if not ctx.sent:
                internal = ApiError(500, "internal router error", "server_error", None)
                self._respond(conn, ctx, 500, internal.body(), b"application/json")
            else:
                conn.close()
        finally:
            self.inflight -= 1
            if ctx.status and ctx.model is not None:
                self.metrics.request(ctx.model, ctx.key_name, ctx.status,
                                     time.monotonic() - req.started)

    async def _handle(self, conn: ClientConnection, req: Request, ctx: _Context) -> None:
        path, method = req.path, req.method
        if req.too_large:
            req.keep_alive = False
            raise ApiError(413, f"request body is larger than {ctx.tables.config.max_body_bytes}"
                           " bytes", "invalid_request_error", "request_too_large")
        endpoint = JSON_ENDPOINTS.get(path) or UPLOAD_ENDPOINTS.get(path)
        if endpoint is not None:
            if method != b"POST":
                raise ApiError(405, "use POST", "invalid_request_error", None)
            if path in UPLOAD_ENDPOINTS:
                await self._upload(conn, req, ctx, endpoint)
            else:
                await self._json(conn, req, ctx, endpoint)
        elif path == b"/v1/models" and method == b"GET":
            entry = self._auth(req, ctx)
            body = ctx.tables.models_body[entry.key.name if entry else ""]
            self._respond(conn, ctx, 200, body, b"application/json")
        elif path == b"/healthz":
            up = sum(1 for rs in ctx.tables.replicas.values() for r in rs
                     if r.health.state == "up")
            self._respond(conn, ctx, 200, orjson.dumps({"status": "ok", "replicas_up": up}),
                          b"application/json")
        elif path == b"/metrics":
            self._respond(conn, ctx, 200, await self.render_metrics(),
                          b"text/plain; version=0.0.4")
        else:
            raise ApiError(404, f"unknown path {path.decode(errors='replace')}",
                           "invalid_request_error", "not_found")

    # auth, model, limits

    def _auth(self, req: Request, ctx: _Context) -> KeyEntry | None:
        if not ctx.tables.keys:
            ctx.key_name = "_anonymous"
            return None
        header = req.headers.get(b"authorization", b"")
        entry = self.key_cache.get(header)
        if entry is None and header not in self.key_cache:
            scheme, _, token = header.partition(b" ")
            entry = None
            if scheme.lower() == b"bearer" and token:
                entry = ctx.tables.keys.get(hash_key(token.strip().decode(errors="replace")))
            if len(self.key_cache) > 10_000:
                self.key_cache.clear()
            self.key_cache[header] = entry
        if entry is None:
            ctx.key_name = "_invalid"
            raise ApiError(401, "invalid API key; pass `Authorization: Bearer sk-...`",
                           "invalid_request_error", "invalid_api_key")
        ctx.key_name = entry.key.name
        expires = entry.key.expires
        if expires is not None and datetime.now(UTC).date() > expires:
            raise ApiError(401, f"API key `{entry.key.name}` expired on {expires.isoformat()}",
                           "invalid_request_error", "invalid_api_key")
        return entry

    def _resolve(self, ctx: _Context, entry: KeyEntry | None, model: Any) -> str:
        if not isinstance(model, str) or not model:
            raise bad_request("`model` is required and must be a string", "model")
        name = ctx.tables.routes.get(model)
        if name is None:
            raise ApiError(404, f"the model `{model}` does not exist", "invalid_request_error",
                           "model_not_found", "model")
        ctx.model = name
        if entry is not None and entry.allowed is not None and name not in entry.allowed:
            raise ApiError(403, f"the key `{entry.key.name}` may not use the model `{model}`",
                           "invalid_request_error", "model_not_allowed", "model")
        return name

    def _admit(self, ctx: _Context, entry: KeyEntry | None, estimate: int) -> None:
        if entry is None or (entry.key.rpm is None and entry.key.tpm is None):
            return
        verdict = entry.limiter.admit(self.loop_now(), estimate)
        if not verdict.ok:
            self.metrics.limited(entry.key.name, verdict.reason)
            raise ApiError(429, f"the key `{entry.key.name}` is over its {verdict.reason} limit;"
                           f" retry in {verdict.retry_after} s", "rate_limit_error",
                           "rate_limit_exceeded", retry_after=verdict.retry_after)
        ctx.limiter, ctx.reservation = entry.limiter, verdict.reservation

    def loop_now(self) -> float:
        return time.time()

    # JSON endpoints

    async def _json(self, conn: ClientConnection, req: Request, ctx: _Context,
                    endpoint: str) -> None:
        entry = self._auth(req, ctx)
        body = b"".join(req.body) if len(req.body) != 1 else req.body[0]
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise bad_request("the request body must be a JSON object")
        model = self._resolve(ctx, entry, doc.get("model"))
        max_tokens = doc.get("max_completion_tokens") or doc.get("max_tokens")
        estimate = len(body) // 4 + (max_tokens if isinstance(max_tokens, int)
                                     else DEFAULT_MAX_TOKENS if endpoint in STREAMABLE else 0)
        self._admit(ctx, entry, estimate)
        stream = endpoint in STREAMABLE and doc.get("stream") is True
        if stream:
            options = doc.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                doc["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                         "include_usage": True}
                ctx.drop_usage = True
                body = orjson.dumps(doc)
        affinity = self._affinity(req, doc)
        mode = "sse" if stream else "raw" if endpoint in RAW_RELAY else "buffer"
        try:
            await self._forward(conn, req, ctx, model, body, mode, affinity)
        finally:
            self._settle(ctx)

    def _affinity(self, req: Request, doc: dict[str, Any]) -> str | None:
        how = self.tables.config.affinity
        if how == "user":
            user = doc.get("user")
            return user if isinstance(user, str) and user else None
        if how == "header":
            value = req.headers.get(self.tables.config.affinity_header.lower().encode())
            return value.decode(errors="replace") if value else None
        return None

    def _settle(self, ctx: _Context) -> None:
        if ctx.limiter is not None:
            ctx.limiter.settle(self.loop_now(), ctx.reservation,
                               ctx.prompt_tokens + ctx.completion_tokens)
        if ctx.model is not None and (ctx.prompt_tokens or ctx.completion_tokens):
            self.metrics.usage(ctx.model, ctx.key_name, ctx.prompt_tokens, ctx.completion_tokens)

    # uploads (multipart, streamed)

    async def _upload(self, conn: ClientConnection, req: Request, ctx: _Context,
                      endpoint: str) -> None:
        entry = self._auth(req, ctx)
        stream = req.stream
        assert stream is not None
        content_type = req.headers.get(b"content-type", b"")
        boundary = multipart.boundary(content_type)
        if boundary is None:
            raise bad_request("the upload must be multipart/form-data")
        head: list[bytes] = []
        size, model = 0, None
        while model is None:
            piece = await stream.read()
            if piece is None:
                break
            head.append(piece)
            size += len(piece)
            if size > ctx.tables.config.max_body_bytes:
                req.keep_alive = False
                raise ApiError(413, "request body is too large", "invalid_request_error",
                               "request_too_large")
            model = multipart.find_field(b"".join(head), boundary, b"model")
        name = self._resolve(ctx, entry, model.decode(errors="replace") if model else None)
        self._admit(ctx, entry, 0)
        length = req.headers.get(b"content-length")
        upload = _Upload(b"".join(head), stream,
                         int(length) if length is not None and length.isdigit() else None)
        try:
            await self._forward(conn, req, ctx, name, upload, "buffer", None)
        finally:
            self._settle(ctx)

    # forwarding with failover

    def _pick(self, model: str, tried: list[ReplicaState],
              affinity: str | None) -> ReplicaState | None:
        now = time.monotonic()
        candidates = [r for r in self.tables.replicas.get(model, ())
                      if r not in tried and r.health.available(now)]
        if len(candidates) == 1:
            return candidates[0]
        index = choose([Load(r.config.id, r.in_flight(), r.config.weight, r.latency)
                        for r in candidates], self.rng, affinity)
        return None if index is None else candidates[index]

    async def _forward(self, conn: ClientConnection, req: Request, ctx: _Context, model: str,
                       body: bytes | _Upload, mode: str, affinity: str | None) -> None:
        config = ctx.tables.config
        tried: list[ReplicaState] = []
        last: Exchange | None = None
        for attempt in range(config.retries + 1):
            replica = self._pick(model, tried, affinity)
            if replica is None:
                break
            if attempt:
                self.metrics.retried(model)
                if isinstance(body, _Upload) and body.consumed:
                    break
            tried.append(replica)
            replica.health.picked()
            replica.started()
            sent = time.monotonic()
            try:
                ex = await self._exchange(replica, req, body, config)
                if ex.status >= 500 or ex.status == 429:
                    await self._await(ex, ex.done, config.timeouts.idle, idle=True)
                    if ex.status >= 500:
                        self._failed(replica)
                    last = ex
                    continue
                if mode == "buffer" or ex.status >= 300:
                    await self._await(ex, ex.done, config.timeouts.idle, idle=True)
                    self._succeeded(replica, sent)
                    ctx.overhead_base = ex.last_data - sent
                    result = ex.body()
                    if ex.status < 300:
                        ctx.count_usage(result)
                    self._respond(conn, ctx, ex.status, result,
                                  ex.content_type or b"application/json")
                    return
                self._succeeded(replica, sent)
                if ctx.model is not None:
                    self.metrics.first_token(ctx.model, time.monotonic() - req.started)
                await self._relay(conn, ctx, ex, mode, sent, config.timeouts.idle)
                return
            except UpstreamError as exc:
                self._failed(replica)
                log.debug("router: %s replica %s failed: %s", model, replica.config.id, exc)
            finally:
                replica.ended()
        if last is not None:
            ctx.overhead_base = 0.0
            extra = b"Retry-After: %s\r\n" % last.retry_after if last.retry_after else b""
            self._respond(conn, ctx, last.status, last.body(),
                          last.content_type or b"application/json", extra)
            return
        raise ApiError(503, f"no healthy replica of the model `{model}` answered",
                       "server_error", "no_healthy_replica")

    async def _exchange(self, replica: ReplicaState, req: Request, body: bytes | _Upload,
                        config: RouterConfig) -> Exchange:
        """Send the request; return once the first body byte (or the end) has arrived."""
        pool = replica.pool
        content_type = req.headers.get(b"content-type", b"application/json")
        for _ in range(2):
            conn = pool.take_idle()
            fresh = conn is None
            if conn is None:
                conn = await pool.connect(config.timeouts.connect)
            ex = Exchange(self.loop)
            if isinstance(body, _Upload):
                conn.send(ex, request_head(req.method, req.url, pool, replica.api_key,
                                           content_type, body.length))
                await body.send(conn)
            else:
                conn.send(ex, request_head(req.method, req.url, pool, replica.api_key,
                                           content_type, len(body)) + body)
            try:
                await self._await(ex, ex.first, config.timeouts.first_byte, idle=False)
                return ex
            except UpstreamError:
                # a reused keep-alive connection the replica closed meanwhile: try a fresh one
                if fresh or ex.got_bytes or ex.status or isinstance(body, _Upload):
                    raise
        raise UpstreamError(f"{pool.url} keeps closing connections")

    async def _await(self, ex: Exchange, fut: asyncio.Future[None], timeout: float,
                     idle: bool) -> None:
        """Wait for `fut`; a deadline (fixed, or since the last byte when `idle`) aborts."""
        if fut.done():
            fut.result()
            return
        loop = self.loop
        handles: list[asyncio.TimerHandle] = []

        def check() -> None:
            if fut.done():
                return
            if idle:
                left = ex.last_data + timeout - time.monotonic()
                if left > 0:
                    handles[0] = loop.call_later(left, check)
                    return
            ex.abort()
            ex._fail(UpstreamError("upstream timed out"))

        handles.append(loop.call_later(timeout, check))
        try:
            await fut
        finally:
            handles[0].cancel()
            if not fut.done():  # cancelled by a client disconnect
                ex.abort()

    async def _relay(self, conn: ClientConnection, ctx: _Context, ex: Exchange, mode: str,
                     sent: float, idle: float) -> None:
        """Send the status now and every chunk as it comes; end with an error event on failure."""
        upstream: UpstreamConnection | None = ex.conn
        content_type = ex.content_type or (b"text/event-stream" if mode == "sse"
                                           else b"application/octet-stream")
        ctx.overhead_base = ex.last_data - sent
        conn.start_chunked(ex.status, content_type, ctx.overhead_header(time.monotonic()))
        ctx.sent = True
        ctx.status = ex.status
        relay = _SseRelay(conn, ctx) if mode == "sse" else None
        for piece in ex.chunks:
            if relay is not None:
                relay.feed(piece)
            else:
                conn.chunk(piece)
        ex.chunks = []
        failure: list[BaseException] = []

        def sink(data: bytes | None, exc: BaseException | None) -> None:
            if data is not None:
                if relay is not None:
                    relay.feed(data)
                else:
                    conn.chunk(data)
            elif exc is not None:
                failure.append(exc)

        def on_pause(paused: bool) -> None:
            if upstream is not None:
                upstream.pause() if paused else upstream.resume()

        if ex.done.done():
            if ex.done.exception() is not None:
                failure.append(ex.done.exception())  # type: ignore[arg-type]
        else:
            ex.sink = sink
            conn.on_pause = on_pause
            try:
                await self._await(ex, ex.done, idle, idle=True)
            except UpstreamError as exc:
                failure.append(exc)
            finally:
                conn.on_pause = None
                ex.sink = None
        if relay is not None:
            relay.flush()
        if failure:
            if relay is not None:
                conn.chunk(b'data: {"error":{"message":"the model replica failed mid-stream",'
                           b'"type":"server_error","param":null,"code":"upstream_error"}}\n\n')
            conn.end_chunked()
            conn.close()
            return
        conn.end_chunked()

    # replica bookkeeping

    def _succeeded(self, replica: ReplicaState, sent: float) -> None:
        if replica.health.state != "up":
            log.info("router: model %s replica %s is back up", replica.model, replica.config.id)
        replica.health.succeeded()
        replica.latency += EWMA * ((time.monotonic() - sent) - replica.latency)

    def _failed(self, replica: ReplicaState) -> None:
        if replica.health.failed(time.monotonic()):
            self.metrics.ejected(replica.model, replica.config.id)
            log.warning("router: model %s replica %s ejected for %.0f s after %d failures",
                        replica.model, replica.config.id, replica.health.backoff,
                        replica.health.failures)

    def _respond(self, conn: ClientConnection, ctx: _Context, status: int, body: bytes,
                 content_type: bytes, extra: bytes = b"") -> None:
        ctx.status = status
        ctx.sent = True
        conn.respond(status, body, content_type, extra + ctx.overhead_header(time.monotonic()),
                     keep_alive=ctx.req.keep_alive)

    # active health probes

    async def probe_forever(self) -> None:
        """Probe every replica's health path each `health.interval` seconds."""
        while True:
            tables = self.tables
            replicas = [r for rs in tables.replicas.values() for r in rs]
            await asyncio.gather(*(self._probe(r, tables.config) for r in replicas))
            await asyncio.sleep(tables.config.health.interval)

    async def _probe(self, replica: ReplicaState, config: RouterConfig) -> None:
        pool = replica.pool
        ok = False
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(pool.host, pool.port), config.timeouts.connect)
            auth = b"Authorization: Bearer %s\r\n" % replica.api_key if replica.api_key else b""
            writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n" % (
                replica.config.health_path.encode(), pool.host_header, auth))
            line = await asyncio.wait_for(reader.readline(), config.health.interval)
            ok = line.split(b" ")[1:2] == [b"200"]
        except (OSError, TimeoutError, IndexError):
            ok = False
        finally:
            if writer is not None:
                writer.close()
        if ok:
            if replica.health.state != "up":
                log.info("router: model %s replica %s passed its health probe",
                         replica.model, replica.config.id)
            replica.health.succeeded()
        else:
            self._failed(replica)


class _Context:
    """Per-request bookkeeping."""

    __slots__ = ("completion_tokens", "drop_usage", "key_name", "limiter", "model",
                 "overhead_base", "prompt_tokens", "req", "reservation", "sent", "status",
                 "tables")

    def __init__(self, req: Request, tables: Tables) -> None:
        self.req = req
        self.tables = tables
        self.model: str | None = None
        self.key_name = ""
        self.status = 0
        self.sent = False
        self.drop_usage = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.limiter: Limiter | None = None
        self.reservation = (0, 0)
        self.overhead_base = 0.0
        """Seconds spent waiting on the upstream, subtracted from the overhead."""

    def overhead_header(self, now: float) -> bytes:
        ms = max(0.0, (now - self.req.started - self.overhead_base) * 1000)
        return b"%s: %.3f\r\n" % (OVERHEAD_HEADER, ms)

    def count_usage(self, body: bytes) -> None:
        usage = find_usage(body)
        if usage is not None:
            self.add_usage(usage)

    def add_usage(self, usage: dict[str, Any]) -> None:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            self.prompt_tokens += prompt
        if isinstance(completion, int):
            self.completion_tokens += completion
        elif isinstance(usage.get("total_tokens"), int) and isinstance(prompt, int):
            self.completion_tokens += usage["total_tokens"] - prompt


def find_usage(body: bytes) -> dict[str, Any] | None:
    """The last non-null `"usage": {...}` object in a JSON body, without parsing all of it."""
    pos = len(body)
    while True:
        pos = body.rfind(b'"usage"', 0, pos)
        if pos < 0:
            return None
        start = body.find(b"{", pos + 7, pos + 64)
        if start >= 0 and body[pos + 7:start].strip(b" \t\r\n:") == b"":
            depth = 0
            for end in range(start, min(len(body), start + 4096)):
                char = body[end]
                if char == 123:
                    depth += 1
                elif char == 125:
                    depth -= 1
                    if depth == 0:
                        try:
                            usage = orjson.loads(body[start:end + 1])
                        except orjson.JSONDecodeError:
                            return None
                        return usage if isinstance(usage, dict) else None
            return None


def _has_usage(event: bytes) -> bool:
    """Does this SSE text carry a non-null usage object?"""
    pos = event.find(b'"usage"')
    while pos >= 0:
        rest = event[pos + 7:pos + 16].lstrip(b" :")
        if rest.startswith(b"{"):
            return True
        pos = event.find(b'"usage"', pos + 7)
    return False


class _SseRelay:
    """Passes SSE events through whole, reading usage and dropping the usage-only chunk
    the router asked for when the client did not."""

    def __init__(self, conn: ClientConnection, ctx: _Context) -> None:
        self.conn = conn
        self.ctx = ctx
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
        if _has_usage(complete):
            complete = self._usage(complete)
        self.conn.chunk(complete)

    def flush(self) -> None:
        if self.buf:
            rest, self.buf = self.buf, b""
            self.conn.chunk(self._usage(rest) if _has_usage(rest) else rest)

    def _usage(self, text: bytes) -> bytes:
        kept = []
        for event in text.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not _has_usage(event):
                kept.append(event)
                continue
            payload = event.partition(b"data:")[2].strip()
            try:
                doc = orjson.loads(payload)
            except orjson.JSONDecodeError:
                kept.append(event)
                continue
            usage = doc.get("usage") if isinstance(doc, dict) else None
            if isinstance(usage, dict):
                self.ctx.add_usage(usage)
            if self.ctx.drop_usage and isinstance(doc, dict) and not doc.get("choices"):
                continue
            if self.ctx.drop_usage and isinstance(doc, dict):
                doc["usage"] = None
                event = b"data: " + orjson.dumps(doc)
            kept.append(event)
        return b"\n\n".join(kept)


class _Upload:
    """A multipart body: the head read to find `model`, then the rest streamed."""

    def __init__(self, head: bytes, stream: Any, length: int | None) -> None:
        self.head = head
        self.stream = stream
        self.length = length
        self.consumed = False

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
