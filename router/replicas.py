"""A replica and what this router process knows about it: its connection pool, health,
requests in flight (shared by the workers), recent latency; and its active probe.

Requests and probes feed the same health state (`router.health`): `answered` and
`probe` passing bring a replica back up, `failed` counts towards ejection.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from router.config import Replica, RouterConfig
from router.health import ReplicaHealth
from router.metrics import Metrics
from router.shared import SharedState
from router.upstream import Pool

log = logging.getLogger("stack-router")

EWMA = 0.2
"""Weight of the newest response time in a replica's moving average latency."""


class ReplicaState:
    """A replica and what this process knows about it."""

    __slots__ = ("api_key", "config", "health", "latency", "load", "model", "outstanding",
                 "pool", "slot", "turn")

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
        self.turn = 0
        """Its place in this process's weighted round robin (`router.balance.in_turn`)."""
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

    def answered(self, sent: float) -> None:
        """A request sent at `sent` (monotonic) got its answer."""
        if self.health.state != "up":
            log.info("router: model %s replica %s is back up", self.model, self.config.id)
        self.health.succeeded()
        self.latency += EWMA * ((time.monotonic() - sent) - self.latency)

    def failed(self, metrics: Metrics) -> None:
        """A request or probe failed: count it, and log and count an ejection."""
        if self.health.failed(time.monotonic()):
            metrics.ejected(self.model, self.config.id)
            log.warning("router: model %s replica %s ejected for %.0f s after %d failures",
                        self.model, self.config.id, self.health.backoff, self.health.failures)

    async def probe(self, config: RouterConfig, metrics: Metrics) -> None:
        """GET the replica's health path with its key; a 200 counts as a success."""
        if await self._probe_ok(config):
            if self.health.state != "up":
                log.info("router: model %s replica %s passed its health probe",
                         self.model, self.config.id)
            self.health.succeeded()
        else:
            self.failed(metrics)

    async def _probe_ok(self, config: RouterConfig) -> bool:
        pool = self.pool
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(pool.host, pool.port), config.timeouts.connect)
            auth = b"Authorization: Bearer %s\r\n" % self.api_key if self.api_key else b""
            writer.write(b"GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n" % (
                self.config.health_path.encode(), pool.host_header, auth))
            line = await asyncio.wait_for(reader.readline(), config.health.interval)
            return line.split(b" ")[1:2] == [b"200"]
        except (OSError, TimeoutError, IndexError):
            return False
        finally:
            if writer is not None:
                writer.close()
