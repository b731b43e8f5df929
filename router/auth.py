"""Who may call what, and how often: the caller's API key, the models it may use, and
admission under its `rpm`/`tpm` limits (counted by `router.limits`).

Each check names the key in the request's context (the `key` label of the metrics) and
raises an `ApiError` in OpenAI's shape when the request may not go on.
"""

from __future__ import annotations

import hashlib
from datetime import date
from hmac import compare_digest
from typing import Any

from router.context import Context
from router.errors import ApiError, bad_request
from router.metrics import Metrics
from router.server import ClientConnection
from router.tables import KeyEntry

REMEMBERED_HEADER_BYTES = 512
"""Longest `Authorization` header a connection remembers (with its key's digest)."""


def authenticate(ctx: Context, conn: ClientConnection, header: bytes,
                 today: date) -> KeyEntry | None:
    """The caller's key entry (None when the router has no keys), or a 401.

    The key a request presents is hashed (SHA-256) and the digest looked up in the tables
    built from the config. A connection remembers its last header that held a valid key,
    and that key's digest: a keep-alive client sending the same header again is not
    hashed again, and its digest is still looked up in the tables of the moment (a
    reload that drops the key refuses it). Nothing else is kept of what clients send:
    a junk key is never remembered, and each connection holds at most one header."""
    if not ctx.tables.keys:
        ctx.key_name = "_anonymous"
        return None
    if conn.key_header and compare_digest(header, conn.key_header):
        entry = ctx.tables.digests.get(conn.key_digest)
    else:
        digest = key_digest(header)
        entry = None
        if digest is not None:
            entry = ctx.tables.digests.get(digest)
            if entry is not None and len(header) <= REMEMBERED_HEADER_BYTES:
                conn.key_header, conn.key_digest = header, digest
    if entry is None:
        ctx.key_name = "_invalid"
        raise ApiError(401, "invalid API key; pass `Authorization: Bearer sk-...`",
                       "invalid_request_error", "invalid_api_key")
    ctx.key_name = entry.key.name
    expires = entry.key.expires
    if expires is not None and today > expires:
        raise ApiError(401, f"API key `{entry.key.name}` expired on {expires.isoformat()}",
                       "invalid_request_error", "invalid_api_key")
    return entry


def key_digest(header: bytes) -> bytes | None:
    """The SHA-256 digest of the bearer token in an `Authorization` header, or None."""
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return hashlib.sha256(token).digest() if token else None


def resolve(ctx: Context, entry: KeyEntry | None, model: Any) -> str:
    """The model a request's `model` names (a name or an alias), if the key may use it."""
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


def admit(ctx: Context, entry: KeyEntry | None, now: float, estimate: int,
          metrics: Metrics) -> None:
    """Count the request against the key's limits (reserving `estimate` tokens), or a 429."""
    if entry is None or (entry.key.rpm is None and entry.key.tpm is None):
        return
    verdict = entry.limiter.admit(now, estimate)
    if not verdict.ok:
        metrics.limited(entry.key.name, verdict.reason)
        raise ApiError(429, f"the key `{entry.key.name}` is over its {verdict.reason} limit;"
                       f" retry in {verdict.retry_after} s", "rate_limit_error",
                       "rate_limit_exceeded", retry_after=verdict.retry_after)
    ctx.limiter, ctx.reservation = entry.limiter, verdict.reservation


def settle(ctx: Context, now: float) -> None:
    """Replace the key's reserved tokens by the ones the request really used."""
    if ctx.limiter is not None:
        ctx.limiter.settle(now, ctx.reservation, ctx.usage.total())
