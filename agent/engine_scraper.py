"""Reading the backends' metrics pages, on request, for `/metrics` and `/v1/status`.

Scraped when asked, not by a loop: an agent nobody watches does no work, and the numbers
are as fresh as the request. A scrape is kept `FRESH_SECONDS`, and requests that come
together wait for the one scrape in progress, so Prometheus, `stack status` and the live
view do not multiply the load on the backends. A backend cannot hurt the agent: every
page arrives whole within `TIMEOUT_SECONDS` and `MAX_PAGE_BYTES`, or the scrape failed
(`up` False), as does a page that does not parse.

Only instances that should be serving are scraped: those of a backend with metrics
(`agent.engine_metrics.SOURCES`), not a multi-node worker (the main serves), in state
`ready` or `unhealthy`. An instance that is starting, crashed or stopped has no engine
series; its state says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent import health
from agent.assignment import Instance
from agent.engine_metrics import DOWN, EngineSample, PageError, has_metrics, read_page

log = logging.getLogger("agent.engine")

PATH = "/metrics"
TIMEOUT_SECONDS = 2.0
MAX_PAGE_BYTES = 1024 * 1024
FRESH_SECONDS = 2.0
SERVING_STATES = frozenset({"ready", "unhealthy"})


@dataclass(frozen=True)
class Target:
    """One instance's metrics page."""

    instance: str
    backend: str
    host: str
    port: int
    api_key: str | None = field(default=None, repr=False)


def targets(instances: Iterable[tuple[Instance, str]]) -> list[Target]:
    """The pages to read, from each desired instance and its state."""
    return [Target(inst.id, inst.backend, inst.host, inst.port, inst.api_key)
            for inst, state in instances
            if has_metrics(inst.backend) and inst.role != "worker" and state in SERVING_STATES]


class EngineScraper:
    """Scrapes the targets' pages, each at most once per `fresh_seconds`."""

    def __init__(self, fresh_seconds: float = FRESH_SECONDS, timeout: float = TIMEOUT_SECONDS,
                 limit: int = MAX_PAGE_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fresh_seconds, self.timeout, self.limit = fresh_seconds, timeout, limit
        self._clock = clock
        self._cache: dict[Target, tuple[float, EngineSample]] = {}
        self._lock = asyncio.Lock()

    async def read(self, wanted: list[Target]) -> dict[str, EngineSample]:
        """The latest sample of each target, by instance id."""
        async with self._lock:
            now = self._clock()
            stale = [t for t in wanted
                     if t not in self._cache or now - self._cache[t][0] >= self.fresh_seconds]
            if stale:
                samples = await asyncio.gather(*(self._scrape(t) for t in stale))
                done = self._clock()
                for target, sample in zip(stale, samples, strict=True):
                    self._cache[target] = (done, sample)
            self._cache = {t: self._cache[t] for t in wanted}  # forget the rest
            return {t.instance: self._cache[t][1] for t in wanted}

    async def _scrape(self, target: Target) -> EngineSample:
        where = f"{target.backend} metrics of instance {target.instance} " \
                f"({target.host}:{target.port}{PATH})"
        try:
            status, body = await health.get(target.host, target.port, PATH, target.api_key,
                                            limit=self.limit, timeout=self.timeout)
            if status != 200:
                raise PageError(f"HTTP {status}")
            sample = read_page(target.backend, body.decode("utf-8", errors="replace"))
        except TimeoutError:
            return self._failed(target, where, f"no answer within {self.timeout:g} s")
        except (OSError, health.ResponseTooLarge, ValueError, PageError) as exc:
            return self._failed(target, where, str(exc) or type(exc).__name__)
        if self._was_down(target):
            log.info("%s readable again", where)
        return sample

    def _was_down(self, target: Target) -> bool:
        old = self._cache.get(target)
        return old is not None and not old[1].up

    def _failed(self, target: Target, where: str, reason: str) -> EngineSample:
        if not self._was_down(target):  # one line when it starts failing, not every scrape
            log.warning("%s cannot be read: %s", where, reason[:200])
        return DOWN
