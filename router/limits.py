"""Per-key request and token limits over a sliding minute.

Token limits reserve an estimate when a request is admitted and settle on the real usage
when it ends. Pure: the clock is passed in. With one worker the windows are plain lists;
with several, `router.shared` backs them with shared memory (same code, other cells).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

WINDOW = 60
"""Seconds in the sliding window, counted in one-second buckets."""

Cells = list[int] | memoryview
"""WINDOW integers: a list, or a shared-memory view cast to int64."""


@dataclass(slots=True)
class Window:
    """Amounts added per second over the last WINDOW seconds."""

    buckets: Cells = field(default_factory=lambda: [0] * WINDOW)
    stamps: Cells = field(default_factory=lambda: [-1] * WINDOW)
    cache: Cells = field(default_factory=lambda: [-1, 0])
    """(second, total over the window ending at that second): the sum is computed once
    per second, then kept up to date by `add` and `adjust`."""

    def total(self, second: int) -> int:
        cache = self.cache
        if cache[0] == second:
            return cache[1]
        total = sum(b for b, s in zip(self.buckets, self.stamps, strict=True)
                    if second - WINDOW < s <= second)
        cache[0], cache[1] = second, total
        return total

    def add(self, second: int, amount: int) -> None:
        i = second % WINDOW
        if self.stamps[i] != second:
            self.buckets[i], self.stamps[i] = 0, second
        self.buckets[i] += amount
        if self.cache[0] == second:
            self.cache[1] += amount
        else:
            self.cache[0] = -1

    def adjust(self, second: int, now_second: int, amount: int) -> None:
        """Correct an earlier bucket if it is still in the window."""
        i = second % WINDOW
        if self.stamps[i] == second and now_second - second < WINDOW:
            old = self.buckets[i]
            self.buckets[i] = new = max(0, old + amount)
            cache = self.cache
            if cache[0] >= 0 and cache[0] - WINDOW < second <= cache[0]:
                cache[1] += new - old
            else:
                cache[0] = -1

    def retry_after(self, second: int, limit: int, need: int) -> int:
        """Whole seconds until `need` more fits under `limit`."""
        live = sorted((s, b) for b, s in zip(self.buckets, self.stamps, strict=True)
                      if second - WINDOW < s <= second)
        excess = sum(b for _, b in live) + need - limit
        for s, b in live:
            excess -= b
            if excess <= 0:
                return max(1, s + WINDOW - second)
        return WINDOW


@dataclass(frozen=True, slots=True)
class Verdict:
    """Admission result: `reservation` to settle later, or why not and for how long."""

    ok: bool
    reason: str = ""
    retry_after: int = 0
    reservation: tuple[int, int] = (0, 0)
    """(second, tokens reserved)."""
    whose: int = 0
    """Which of the request's limited identities refused it (0: its key, 1: its user)."""


class Limiter(Protocol):
    """What the router needs of a key's limiter (process-local or shared)."""

    def admit(self, now: float, estimate: int) -> Verdict: ...

    def settle(self, now: float, reservation: tuple[int, int], used: int) -> None: ...

    def cancel(self, now: float, reservation: tuple[int, int]) -> None: ...


@dataclass(slots=True)
class KeyLimiter:
    """Limits of one key."""

    rpm: int | None
    tpm: int | None
    requests: Window = field(default_factory=Window)
    tokens: Window = field(default_factory=Window)

    def admit(self, now: float, estimate: int) -> Verdict:
        """Admit a request expected to use `estimate` tokens, or say when to retry."""
        second = math.floor(now)
        if self.rpm is not None and self.requests.total(second) + 1 > self.rpm:
            return Verdict(False, "rpm", self.requests.retry_after(second, self.rpm, 1))
        if self.tpm is not None:
            estimate = min(estimate, self.tpm)
            if self.tokens.total(second) + estimate > self.tpm:
                return Verdict(False, "tpm", self.tokens.retry_after(second, self.tpm, estimate))
            self.tokens.add(second, estimate)
        self.requests.add(second, 1)
        return Verdict(True, reservation=(second, estimate if self.tpm is not None else 0))

    def settle(self, now: float, reservation: tuple[int, int], used: int) -> None:
        """Replace the reserved estimate by the tokens the request really used."""
        if self.tpm is None:
            return
        second, reserved = reservation
        now_second = math.floor(now)
        if now_second - second < WINDOW:
            self.tokens.adjust(second, now_second, used - reserved)

    def cancel(self, now: float, reservation: tuple[int, int]) -> None:
        """Take back an admission (another limit of the request refused it)."""
        second = reservation[0]
        self.requests.adjust(second, math.floor(now), -1)
        self.settle(now, reservation, 0)
