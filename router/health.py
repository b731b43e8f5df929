"""A replica's health: passive ejection after consecutive failures, backoff, half-open retry.

Pure state machine; the clock is passed in. Active probes and real requests feed it the
same way (`succeeded`, `failed`).

    up --(eject_after failures)--> ejected --(backoff elapsed)--> half-open
    half-open --(trial succeeds)--> up;  half-open --(trial fails)--> ejected (backoff x2)
"""

from __future__ import annotations

from dataclasses import dataclass

FIRST_BACKOFF = 1.0


@dataclass(slots=True)
class ReplicaHealth:
    """Health of one replica as seen by this router process."""

    eject_after: int = 3
    backoff_max: float = 60.0
    state: str = "up"
    failures: int = 0
    backoff: float = 0.0
    until: float = 0.0
    trial: bool = False
    """True while the half-open trial request is in flight."""

    def available(self, now: float) -> bool:
        """May a request be sent now?"""
        if self.state == "up":
            return True
        if self.state == "ejected":
            if now < self.until:
                return False
            self.state, self.trial = "half-open", False
        return not self.trial

    def picked(self) -> None:
        """A request was sent: in half-open it is the one trial."""
        if self.state == "half-open":
            self.trial = True

    def succeeded(self) -> None:
        self.state, self.failures, self.backoff, self.trial = "up", 0, 0.0, False

    def failed(self, now: float) -> bool:
        """Count a failure; True when this failure ejected the replica."""
        self.failures += 1
        if self.state == "half-open" or (self.state == "up" and self.failures >= self.eject_after):
            grown = self.backoff * 2 if self.backoff else FIRST_BACKOFF
            self.backoff = min(self.backoff_max, grown)
            self.state, self.until, self.trial = "ejected", now + self.backoff, False
            return True
        return False
