"""Who may call what, and how often: the caller's API key, the models it may use, and
admission under its `rpm`/`tpm` limits (counted by `router.limits`).

Each check names the key in the request's context (the `key` label of the metrics) and
raises an `ApiError` in OpenAI's shape when the request may not go on.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import date
from typing import Any

from router.context import Context
from router.errors import ApiError, bad_request
from router.limits import Verdict
from router.metrics import Metrics
from router.store import Store
from router.tables import KeyEntry, Limited


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
    ctx.user_name = entry.key.user or ""
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


async def admit(ctx: Context, entry: KeyEntry | None, now: float, estimate: int,
                metrics: Metrics, store: Store | None, refuse_without_store: bool) -> None:
    """Count the request against its key's limits and its user's (reserving `estimate`
    tokens), or a 429. With a shared `store` the count is the store's, one round trip for
    both; while it does not answer, this router's (or a 503 when `refuse_without_store`)."""
    if entry is None or not entry.limited:
        return
    verdict = None
    if store is not None:
        verdict = await store.admit([(x.shared_id, x.rpm, x.tpm) for x in entry.limited],
                                    estimate)
        if verdict is None:
            metrics.store_fallback("refuse" if refuse_without_store else "local")
            if refuse_without_store:
                raise ApiError(503, "the shared limit store does not answer and "
                               "`limits.on_store_down` is `refuse`; retry in a moment",
                               "server_error", "limit_store_unavailable", retry_after=1)
        else:
            ctx.store, ctx.reservations = store, (verdict.reservation,)
    if verdict is None:
        verdict, ctx.reservations = _admit_here(entry.limited, now, estimate)
    if not verdict.ok:
        who = entry.limited[verdict.whose]
        metrics.limited(entry.key.name, verdict.reason if who.who == "key"
                        else f"user_{verdict.reason}")
        holder = "" if who.who == "key" else f" (the key `{entry.key.name}`'s)"
        raise ApiError(429, f"the {who.who} `{who.name}`{holder} is over its {verdict.reason} "
                       f"limit; retry in {verdict.retry_after} s", "rate_limit_error",
                       "rate_limit_exceeded", retry_after=verdict.retry_after)
    ctx.limited = entry.limited


def _admit_here(limited: tuple[Limited, ...], now: float, estimate: int
                ) -> tuple[Verdict, tuple[tuple[int, int], ...]]:
    """Admit against each identity's windows in this router (the verdict, and each one's
    reservation); one that refuses takes back the admissions before it."""
    taken: list[tuple[int, int]] = []
    for i, x in enumerate(limited):
        verdict = x.limiter.admit(now, estimate)
        if not verdict.ok:
            for earlier, reservation in zip(limited, taken, strict=False):
                earlier.limiter.cancel(now, reservation)
            return replace(verdict, whose=i), ()
        taken.append(verdict.reservation)
    return verdict, tuple(taken)


def settle(ctx: Context, now: float) -> None:
    """Replace the reserved tokens by the ones the request really used."""
    used = ctx.usage.total()
    if ctx.store is not None:
        ctx.store.settle([x.shared_id for x in ctx.limited if x.tpm is not None],
                         ctx.reservations[0], used)
        return
    for x, reservation in zip(ctx.limited, ctx.reservations, strict=False):
        x.limiter.settle(now, reservation, used)
