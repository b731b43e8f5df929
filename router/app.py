"""The router's request handler: which endpoint a request is for, and the steps each one
takes (key, model, limits, then forwarding to a replica).

One `Router` per process. Its `Tables` (routes, keys, replicas) are rebuilt from the
config on reload (`router.tables`). The steps live in their own modules:

    auth       the caller's key, the models it may use, its limits
    forward    picking a replica, failover before the first byte
    relay      streaming the answer (SSE events or raw bytes)
    usage      token estimates and the usage replicas report
    errors     OpenAI-shaped error answers
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson

from router import auth
from router.config import RouterConfig
from router.context import Context
from router.errors import ApiError, bad_request
from router.forward import Forwarder
from router.metrics import Metrics, ReplicaGauge, combine
from router.multipart import read_upload
from router.prefix import prefix_key
from router.relay import Mode
from router.rendering import TRANSCRIPT_FORMATS, image_urls, transcript
from router.replicas import ReplicaState
from router.server import ClientConnection, Request
from router.shared import SharedState
from router.store import Store
from router.tables import KeyEntry, build_tables, model_entry
from router.usage import ask_for_usage, estimate_tokens

log = logging.getLogger("stack-router")

JSON_ENDPOINTS = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/responses": "responses",
    b"/v1/messages": "messages",
    b"/v1/embeddings": "embeddings",
    b"/v1/rerank": "rerank",
    b"/rerank": "rerank",
    b"/v2/rerank": "rerank",
    b"/score": "score",
    b"/v1/score": "score",
    b"/v1/audio/speech": "speech",
    b"/v1/images/generations": "images",
}
UPLOAD_ENDPOINTS = {
    b"/v1/audio/transcriptions": "transcriptions",
    b"/v1/audio/translations": "transcriptions",
    b"/v1/images/edits": "images",
}
"""Multipart endpoints; translations answer as transcriptions do, edits as generations."""
GET_ENDPOINTS = {b"/v1/models": b"GET", b"/healthz": b"GET", b"/metrics": b"GET"}
"""The other paths and the method each takes (another gets a 405 with `Allow`)."""
MODEL_PATH = b"/v1/models/"
"""`/v1/models/{id}` (GET): one model of the key's list, answered by the router."""
STREAMABLE = {"chat", "completions", "responses", "messages"}
"""Endpoints whose `stream: true` means an SSE response with token usage to count."""
USAGE_OPTION = {"chat", "completions"}
"""Streams that end with a usage chunk only when asked (`stream_options`)."""
RAW_RELAY = {"speech"}
"""Endpoints whose (binary) response is relayed as it comes, without usage."""


def alias_members(served: str, asked: str) -> tuple[tuple[bytes, bytes], ...]:
    """The `"model"` members an answer names the served model with (compact, as llama.cpp
    and vLLM write them, and spaced), each with the one naming the alias instead."""
    name, alias = orjson.dumps(served), orjson.dumps(asked)
    return tuple((b'"model"%s%s' % (sep, name), b'"model"%s%s' % (sep, alias))
                 for sep in (b":", b": "))


class Router:
    """The request handler of one process."""

    def __init__(self, config: RouterConfig, loop: asyncio.AbstractEventLoop,
                 seed: int | None = None, shared: SharedState | None = None,
                 slot: int = 0) -> None:
        self.loop = loop
        self.metrics = Metrics()
        self.shared = shared
        self.slot = slot
        """This worker's number when `shared` (several workers)."""
        self.tables = build_tables(config, None, loop, shared, slot)
        self.store = Store(config.limits.store) if config.limits.store else None
        """The limit store every router host shares (`limits.store`), if there is one."""
        self.forwarder = Forwarder(
            loop, random.Random(seed), self.metrics,
            lambda model: self.tables.replicas.get(model, ()),
            lambda: self.tables.config.balancing == "round-robin")
        self.inflight = 0

    def reload(self, config: RouterConfig) -> None:
        self.tables = build_tables(config, self.tables, self.loop, self.shared, self.slot)
        url = config.limits.store
        if (self.store.url if self.store else None) != url:
            if self.store is not None:
                self.store.close()
            self.store = Store(url) if url else None

    def gauges(self) -> list[ReplicaGauge]:
        return [ReplicaGauge(r.model, r.config.id, r.outstanding, r.health.state == "up")
                for r in self._replicas()]

    def _replicas(self) -> list[ReplicaState]:
        return [r for rs in self.tables.replicas.values() for r in rs]

    def _store_state(self) -> None:
        store = self.store
        self.metrics.store = [int(store.up), store.changes] if store is not None else [-1, 0]

    def snapshot(self) -> bytes:
        """This worker's counters, for the sibling that answers `/metrics`."""
        self._store_state()
        return self.metrics.snapshot(self.gauges())

    async def render_metrics(self) -> bytes:
        """`/metrics`: this process's counters, plus its siblings' with several workers."""
        if self.shared is None:
            self._store_state()
            return self.metrics.render(self.gauges())
        peers = await self.shared.gather(self.slot)
        total = Metrics()
        gauges = total.merge(self.snapshot())
        for data in peers:
            gauges += total.merge(data)
        return total.render(combine(gauges), workers=1 + len(peers))

    async def probe_forever(self) -> None:
        """Probe every replica's health path each `health.interval` seconds."""
        while True:
            config = self.tables.config
            await asyncio.gather(*(r.probe(config, self.metrics) for r in self._replicas()))
            await asyncio.sleep(config.health.interval)

    def loop_now(self) -> float:
        return time.time()

    # entry points used by the server

    def streams_body(self, path: bytes) -> bool:
        return path in UPLOAD_ENDPOINTS

    def max_body(self) -> int:
        return self.tables.config.max_body_bytes

    async def handle(self, conn: ClientConnection, req: Request) -> None:
        self.inflight += 1
        ctx = Context(req, self.tables)
        try:
            await self._dispatch(conn, req, ctx)
        except ApiError as err:
            if not ctx.sent:
                ctx.respond(conn, err.status, err.body(), b"application/json", err.headers())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("router: unexpected error on %s", req.path.decode(errors="replace"))
            if not ctx.sent:
                internal = ApiError(500, "internal router error", "server_error", None)
                ctx.respond(conn, 500, internal.body(), b"application/json")
            else:
                conn.close()
        finally:
            self.inflight -= 1
            if ctx.status and ctx.model is not None:
                self.metrics.request(ctx.model, ctx.key_name, ctx.user_name, ctx.status,
                                     time.monotonic() - req.started)

    async def _dispatch(self, conn: ClientConnection, req: Request, ctx: Context) -> None:
        if req.refusal is not None:
            raise req.refusal
        if req.repeated is not None:
            name = req.repeated.decode(errors="replace")
            raise bad_request(f"the `{name}` header came more than once, which is ambiguous;"
                              " send it once", name)
        path, method = req.path, req.method
        endpoint = JSON_ENDPOINTS.get(path)
        if endpoint is not None and method == b"POST":  # the common case first
            await self._json(conn, req, ctx, endpoint)
            return
        endpoint = endpoint or UPLOAD_ENDPOINTS.get(path)
        allowed = b"POST" if endpoint is not None else GET_ENDPOINTS.get(path)
        if allowed is None and path.startswith(MODEL_PATH):
            allowed = b"GET"
        if allowed is None:
            raise ApiError(404, f"unknown path {path.decode(errors='replace')}",
                           "invalid_request_error", "not_found")
        if method != allowed:
            raise ApiError(405, f"{path.decode()} takes {allowed.decode()}, not "
                           f"{method.decode(errors='replace')}", "invalid_request_error",
                           "method_not_allowed", allow=allowed)
        if path in UPLOAD_ENDPOINTS:
            await self._upload(conn, req, ctx)
        elif endpoint is not None:
            await self._json(conn, req, ctx, endpoint)
        elif path == b"/v1/models":
            entry = self._authenticate(req, ctx)
            body = ctx.tables.models_body[entry.key.name if entry else ""]
            ctx.respond(conn, 200, body, b"application/json")
        elif path.startswith(MODEL_PATH):
            self._model(conn, req, ctx)
        elif path == b"/healthz":
            up = sum(1 for rs in ctx.tables.replicas.values() for r in rs
                     if r.health.state == "up")
            ctx.respond(conn, 200, orjson.dumps({"status": "ok", "replicas_up": up}),
                        b"application/json")
        else:
            ctx.respond(conn, 200, await self.render_metrics(), b"text/plain; version=0.0.4")

    def _authenticate(self, req: Request, ctx: Context) -> KeyEntry | None:
        return auth.authenticate(ctx, req.headers.get(b"authorization", b""),
                                 datetime.now(UTC).date())

    # the endpoints that reach a replica

    async def _json(self, conn: ClientConnection, req: Request, ctx: Context,
                    endpoint: str) -> None:
        entry = self._authenticate(req, ctx)
        body = b"".join(req.body) if len(req.body) != 1 else req.body[0]
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise bad_request("the request body must be a JSON object")
        asked = doc.get("model")
        model = auth.resolve(ctx, entry, asked)
        await self._admit(ctx, entry, estimate_tokens(len(body), doc, endpoint in STREAMABLE))
        stream = endpoint in STREAMABLE and doc.get("stream") is True
        changed = False
        if asked != model:  # an alias: replicas serve the model's name alone
            doc["model"] = model
            ctx.alias = alias_members(model, str(asked))
            changed = True
        if stream and endpoint in USAGE_OPTION and ask_for_usage(doc):
            ctx.usage.drop = True
            changed = True
        if endpoint == "images" and doc.get("response_format") == "url":
            doc["response_format"] = "b64_json"  # the router makes the URL (a data: URL)
            ctx.render = image_urls
            changed = True
        if changed:
            body = orjson.dumps(doc)
        mode: Mode = "sse" if stream else "raw" if endpoint in RAW_RELAY else "buffer"
        affinity = self._affinity(req, doc)
        learned = affinity is None and ctx.tables.config.balancing == "prefix"
        if learned:
            affinity = prefix_key(endpoint, doc)
        try:
            await self.forwarder.forward(conn, ctx, model, body, mode, affinity, learned)
        finally:
            self._settle(ctx)

    def _model(self, conn: ClientConnection, req: Request, ctx: Context) -> None:
        """`/v1/models/{id}`: the model (a name or an alias) as `/v1/models` lists it."""
        entry = self._authenticate(req, ctx)
        asked = unquote_to_bytes(req.path[len(MODEL_PATH):]).decode(errors="replace")
        target = ctx.tables.routes.get(asked)
        if target is None or (entry is not None and entry.allowed is not None
                              and target not in entry.allowed):
            raise ApiError(404, f"the model `{asked[:200]}` does not exist",
                           "invalid_request_error", "model_not_found", "model")
        ctx.respond(conn, 200, orjson.dumps(model_entry(asked)), b"application/json")

    async def _upload(self, conn: ClientConnection, req: Request, ctx: Context) -> None:
        entry = self._authenticate(req, ctx)
        upload, model = await read_upload(req, ctx.tables.config.max_body_bytes)
        asked = model.decode(errors="replace") if model else None
        name = auth.resolve(ctx, entry, asked)
        await self._admit(ctx, entry, 0)
        if asked != name:  # an alias: replicas serve the model's name alone
            upload.set(b"model", name.encode())
            ctx.alias = alias_members(name, str(asked))
        how = upload.field(b"response_format")
        how = how.strip() if how is not None else None
        if UPLOAD_ENDPOINTS[req.path] == "transcriptions" and how in TRANSCRIPT_FORMATS:
            upload.set(b"response_format", b"verbose_json")  # rendered from it
            ctx.render = partial(transcript, how)
        elif UPLOAD_ENDPOINTS[req.path] == "images" and how == b"url":
            upload.set(b"response_format", b"b64_json")  # the router makes a data: URL
            ctx.render = image_urls
        try:
            await self.forwarder.forward(conn, ctx, name, upload, "buffer", None)
        finally:
            self._settle(ctx)

    async def _admit(self, ctx: Context, entry: KeyEntry | None, estimate: int) -> None:
        await auth.admit(ctx, entry, self.loop_now(), estimate, self.metrics, self.store,
                         self.tables.config.limits.on_store_down == "refuse")

    def _affinity(self, req: Request, doc: dict[str, Any]) -> str | None:
        how = self.tables.config.affinity
        if how == "user":
            user = doc.get("user")
            return user if isinstance(user, str) and user else None
        if how == "header":
            value = req.headers.get(self.tables.config.affinity_header.lower().encode())
            return value.decode(errors="replace") if value else None
        return None

    def _settle(self, ctx: Context) -> None:
        """The request ended: settle its key's tokens and count them."""
        auth.settle(ctx, self.loop_now())
        usage = ctx.usage
        if ctx.model is not None and (usage.prompt_tokens or usage.completion_tokens):
            self.metrics.usage(ctx.model, ctx.key_name, ctx.user_name, usage.prompt_tokens,
                               usage.completion_tokens)
