"""The router's tables, derived from one config: routes (names and aliases), each model's
replicas, the keys with their limiters, and the `/v1/models` answer of each key.

Rebuilt on reload; replicas and limiters that did not change carry over, so requests in
flight finish on the objects they started with and limit windows keep counting.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson

from router.config import Key, RouterConfig
from router.limits import KeyLimiter, Limiter
from router.replicas import ReplicaState
from router.shared import SharedState


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
    """Key hash -> entry; a key whose limits did not change keeps its limiter."""
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
    return keys


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
