"""Choosing a replica: least outstanding requests, power of two choices among ties,
optional affinity (a session, or a prompt's first block: `router.prefix`) bounded by
load; or weighted round robin.

Pure: the caller passes the replicas' loads and a random source (or their turns).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from random import Random

AFFINITY_SLACK = 0.25
"""An affine replica may carry this fraction more than the average load (plus one)."""


@dataclass(frozen=True, slots=True)
class Load:
    """What the balancer knows about one candidate replica."""

    id: str
    outstanding: int
    weight: int = 1
    latency: float = 0.0
    """Moving average of recent response times in seconds: the tie breaker."""


HOMES = 65536
"""Prefix keys whose home a worker remembers (the least recently used are forgotten)."""


class Homes(OrderedDict[str, str]):
    """Prefix keys -> the replica each lives on, bounded (no client can make it grow),
    with how many keys each replica holds."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __setitem__(self, key: str, value: str) -> None:
        old = self.get(key)
        if old is not None:
            self.counts[old] -= 1
        super().__setitem__(key, value)
        self.counts[value] = self.counts.get(value, 0) + 1
        self.move_to_end(key)
        if len(self) > HOMES:
            _, gone = self.popitem(last=False)
            self.counts[gone] -= 1


def choose(candidates: Sequence[Load], rng: Random, affinity: str | None = None,
           homes: Homes | None = None) -> int | None:
    """Index of the replica to use, or None when there is no candidate. With `homes`
    (prefix keys -> the replica that took the key first) an affinity is learned rather
    than hashed."""
    if not candidates:
        return None
    if affinity is not None:
        if homes is not None:
            return _learned(candidates, affinity, homes, rng)
        return _affine(candidates, affinity)
    best = min(c.outstanding / c.weight for c in candidates)
    tied = [i for i, c in enumerate(candidates) if c.outstanding / c.weight == best]
    if len(tied) == 1:
        return tied[0]
    a, b = rng.sample(tied, 2)
    return a if candidates[a].latency <= candidates[b].latency else b


def _bound(candidates: Sequence[Load]) -> int:
    total = sum(c.outstanding for c in candidates)
    return math.ceil((total + 1) * (1 + AFFINITY_SLACK) / len(candidates))


def _learned(candidates: Sequence[Load], key: str, homes: Homes, rng: Random) -> int:
    """The key's home while it is under the bound; else the least loaded replica. A key
    seen first (or whose home is gone) gets the least loaded replica holding the fewest
    keys as its home, so the prompts to cache spread evenly."""
    home = homes.get(key)
    for i, c in enumerate(candidates):
        if c.id == home:
            if c.outstanding + 1 <= _bound(candidates):
                return i
            index = choose(candidates, rng)
            assert index is not None
            return index
    low = min(c.outstanding / c.weight for c in candidates)
    tied = [i for i, c in enumerate(candidates) if c.outstanding / c.weight == low]
    index = min(tied, key=lambda i: (homes.counts.get(candidates[i].id, 0), rng.random()))
    homes[key] = candidates[index].id
    return index


def _affine(candidates: Sequence[Load], affinity: str) -> int:
    """Rendezvous hashing: the first replica in the key's order that is under the bound."""
    bound = _bound(candidates)
    order = sorted(range(len(candidates)), key=lambda i: _score(affinity, candidates[i].id),
                   reverse=True)
    for i in order:
        if candidates[i].outstanding + 1 <= bound:
            return i
    return order[0]


def _score(affinity: str, replica: str) -> int:
    """Rendezvous weight of a session on a replica, the same in every process.

    A real hash: with crc32 (linear over GF(2)) the order of two replicas whose ids differ
    in one byte came out the same for nearly every session.
    """
    digest = hashlib.blake2b(f"{affinity}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def in_turn(weights: Sequence[int], turns: list[int]) -> int:
    """Weighted round robin, smoothly interleaved (as nginx does): every candidate moves
    up by its weight, the one furthest ahead is chosen and moves back by the total. Over
    any sum-of-weights requests each candidate is chosen `weight` times. `turns` (one per
    candidate, kept by the caller between calls) is updated in place."""
    total, best = 0, 0
    for i, weight in enumerate(weights):
        turns[i] += weight
        total += weight
        if turns[i] > turns[best]:
            best = i
    turns[best] -= total
    return best
