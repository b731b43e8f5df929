"""The router's tables, derived from one config: routes (names and aliases), each model's
replicas, the keys with their limiters (and their users'), and the `/v1/models` answer of
each key.

Rebuilt on reload; replicas and limiters that did not change carry over, so requests in
flight finish on the objects they started with and limit windows keep counting.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

import orjson

from router.config import Key, RouterConfig, User
from router.limits import KeyLimiter, Limiter
from router.replicas import ReplicaState
from router.shared import SharedState


@dataclass(frozen=True, slots=True)
class Limited:
    """One identity a request is counted against: its key, or the user holding the key."""

    who: str
    """How errors and metrics name it: "key" or "user"."""
    name: str
    limiter: Limiter
    """Its windows in this router (per process, or per host with several workers)."""
    shared_id: str
    """Its name in the shared store: `key:` + the key's hash, or `user:` + the name."""
    rpm: int | None
    tpm: int | None


@dataclass(slots=True)
class KeyEntry:
    key: Key
    limited: tuple[Limited, ...]
    """The identities with limits the key's requests count against (key, then user)."""
    allowed: frozenset[str] | None
    """Resolved model names the key may use (its own list and its user's); None: all."""


@dataclass(slots=True)
class Tables:
    """Everything derived from one config."""

    config: RouterConfig
    routes: dict[str, str]
    """Model name or alias -> model name."""
    replicas: dict[str, list[ReplicaState]]
    keys: dict[str, KeyEntry]
    """Key hash (`sha256:` + hex) -> entry."""
    digests: dict[bytes, KeyEntry]
    """The same entries by the raw SHA-256 digest, what a presented key is looked up by."""
    models_body: dict[str, bytes]
    """Key name ("" without keys) -> the /v1/models response."""


def build_tables(config: RouterConfig, old: Tables | None, loop: asyncio.AbstractEventLoop,
                 shared: SharedState | None = None, slot: int = 0) -> Tables:
    """Tables for `config`, carrying over unchanged replicas and limiters from `old`.

    With `shared` (several workers; this one is `slot`) limiters count in shared memory by
    key hash, so their windows survive reloads and restarts of a worker whatever the limits
    are, and each replica's requests in flight are counted over all workers.
    """
    routes = {name: model.name for model in config.models
              for name in (model.name, *model.aliases)}
    replicas = _replicas(config, old, loop, shared, slot)
    keys = _keys(config, old, routes, shared)
    digests = {bytes.fromhex(h.removeprefix("sha256:")): e for h, e in keys.items()}
    return Tables(config, routes, replicas, keys, digests, _models_bodies(config, routes, keys))


def _replicas(config: RouterConfig, old: Tables | None, loop: asyncio.AbstractEventLoop,
              shared: SharedState | None, slot: int) -> dict[str, list[ReplicaState]]:
    """Each model's replicas; one whose URL and key did not change is carried over, one
    that left the config has its idle connections closed."""
    old_replicas = {(r.model, r.config.id): r for rs in (old.replicas.values() if old else [])
                    for r in rs}
    replicas: dict[str, list[ReplicaState]] = {}
    for model in config.models:
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
    return replicas


def _keys(config: RouterConfig, old: Tables | None, routes: dict[str, str],
          shared: SharedState | None) -> dict[str, KeyEntry]:
    """Key hash -> entry; a key or user whose limits did not change keeps its limiter."""
    old_limited = {(x.who, x.name): x for e in (old.keys.values() if old else ())
                   for x in e.limited}
    users = {user.name: user for user in config.users}

    def limited(who: str, name: str, ident: str, rpm: int | None,
                tpm: int | None) -> Limited | None:
        if rpm is None and tpm is None:
            return None
        prev = old_limited.get((who, name))
        if prev is not None and (prev.shared_id, prev.rpm, prev.tpm) == (ident, rpm, tpm):
            return prev
        limiter: Limiter | None = None
        if shared is not None:  # by a hash: the shared table's slots are 32 bytes
            limiter = shared.limiter("sha256:" + hashlib.sha256(ident.encode()).hexdigest(),
                                     rpm, tpm)
        return Limited(who, name, limiter or KeyLimiter(rpm, tpm), ident, rpm, tpm)

    user_limits = {name: limited("user", name, f"user:{name}", user.rpm, user.tpm)
                   for name, user in users.items()}
    keys: dict[str, KeyEntry] = {}
    for key in config.keys:
        user = users.get(key.user) if key.user is not None else None
        found = (limited("key", key.name, f"key:{key.hash}", key.rpm, key.tpm),
                 user_limits[user.name] if user is not None else None)
        keys[key.hash] = KeyEntry(key, tuple(x for x in found if x is not None),
                                  _allowed(key, user, routes))
    return keys


def _allowed(key: Key, user: User | None, routes: dict[str, str]) -> frozenset[str] | None:
    """The models a key may use: its own list, within its user's; None: every model."""
    lists = [frozenset(routes[m] for m in models)
             for models in (key.models, user.models if user is not None else [])
             if models]
    return frozenset.intersection(*lists) if lists else None


def model_entry(name: str) -> dict[str, object]:
    """One model of a `/v1/models` list (and the `/v1/models/{id}` answer)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "modelstack"}


def _models_bodies(config: RouterConfig, routes: dict[str, str],
                   keys: dict[str, KeyEntry]) -> dict[str, bytes]:
    """The `/v1/models` answer of each key name ("" when there are no keys)."""
    bodies: dict[str, bytes] = {}
    for name, allowed_set in ([("", None)] if not config.keys
                              else [(e.key.name, e.allowed) for e in keys.values()]):
        data = [model_entry(alias) for alias, target in routes.items()
                if allowed_set is None or target in allowed_set]
        bodies[name] = orjson.dumps({"object": "list", "data": data})
    return bodies
