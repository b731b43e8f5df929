"""Who may call what, and how often: the caller's API key, the models it may use, and
admission under its `rpm`/`tpm` limits (counted by `router.limits`).

Each check names the key in the request's context (the `key` label of the metrics) and
raises an `ApiError` in OpenAI's shape when the request may not go on.
"""

from __future__ import annotations

import hashlib
from datetime import date
from typing import Any

from router.context import Context
from router.errors import ApiError, bad_request
from router.metrics import Metrics
from router.tables import KeyEntry


def authenticate(ctx: Context, header: bytes, today: date) -> KeyEntry | None:
    """The caller's key entry (None when the router has no keys), or a 401.

    Every request hashes the key it presents (0.4 us) and looks the digest up in the
    tables built from the config. Nothing is kept of what clients send: a cache of header
    values would hold raw keys and grow with every junk key a client makes up."""
    if not ctx.tables.keys:
        ctx.key_name = "_anonymous"
        return None
    entry = _lookup(ctx, header)
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


def _lookup(ctx: Context, header: bytes) -> KeyEntry | None:
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return ctx.tables.digests.get(hashlib.sha256(token).digest()) if token else None


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
