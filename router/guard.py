"""What keeps one worker's client connections from holding it: the connection cap (within
the file descriptors the process may open) and the sweep that drops connections past their
deadlines (header, body, keep-alive, send; docs/router.md, "Clients").

The deadlines are plain numbers on each connection, set by the server as a request moves
on; one sweep a fraction of the shortest timeout apart checks them all, so the hot path
arms no timer. A connection that goes idle after an answer is only marked (`KEEPALIVE`):
the next sweep starts its keep-alive time, so an idle connection is closed between
`keepalive_timeout` and that plus two sweep intervals after its last answer.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import TYPE_CHECKING

from router.config import Clients

if TYPE_CHECKING:
    from router.server import ClientConnection

log = logging.getLogger("stack-router")

FD_RESERVE = 64
"""Descriptors kept for everything but client and upstream sockets: the listening socket,
the event loop, the workers' sockets, logs, the config file."""
REFUSAL_LOG_SECONDS = 10.0
"""Connections refused at the cap are logged at most this often (one line per burst)."""


def raise_fd_limit() -> int:
    """Lift the soft limit on open files to the hard one, as far as allowed; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # keep the soft limit; the cap below adapts to it
    return soft


class Limits:
    """`Clients` as plain attributes: the server reads them on every request, and a pydantic
    model's attributes are read through its `__getattr__` hook, a few times slower."""

    __slots__ = ("body_timeout", "header_timeout", "keepalive_timeout", "max_connections",
                 "max_header_bytes", "max_headers", "max_url_bytes", "send_timeout")

    def __init__(self, clients: Clients) -> None:
        self.max_connections = clients.max_connections
        self.header_timeout = clients.header_timeout
        self.body_timeout = clients.body_timeout
        self.keepalive_timeout = clients.keepalive_timeout
        self.send_timeout = clients.send_timeout
        self.max_header_bytes = clients.max_header_bytes
        self.max_headers = clients.max_headers
        self.max_url_bytes = clients.max_url_bytes


class Guard:
    """The client connections of one worker, their cap and their deadlines."""

    def __init__(self, clients: Clients, replicas: int, fd_limit: int) -> None:
        self.connections: set[ClientConnection] = set()
        self.fd_limit = fd_limit
        self.clients = clients
        self.limits = Limits(clients)
        self.limit = clients.max_connections
        self.refused = 0
        self.logged_at = 0.0
        self.configure(clients, replicas)

    def configure(self, clients: Clients, replicas: int) -> None:
        """Take new settings (start, reload). Each client connection may need an upstream
        socket while it is served, and every replica a probe socket: the cap leaves room
        for them, so the health probes can always connect."""
        self.clients = clients
        self.limits = Limits(clients)
        budget = max(1, (self.fd_limit - FD_RESERVE - replicas) // 2)
        self.limit = min(clients.max_connections, budget)
        if self.limit < clients.max_connections:
            log.warning("router: `clients.max_connections` is %d but %d open files allow "
                        "%d client connections per worker (half of what is left after %d "
                        "for the rest); raise the open-file limit (LimitNOFILE) to allow more",
                        clients.max_connections, self.fd_limit, self.limit,
                        FD_RESERVE + replicas)

    def admit(self, conn: ClientConnection) -> bool:
        """Count a new connection, or False when the worker holds its cap already."""
        if len(self.connections) >= self.limit:
            self.refused += 1
            return False
        self.connections.add(conn)
        return True

    def interval(self) -> float:
        """Seconds between sweeps: a quarter of the shortest timeout, 50 ms to 1 s."""
        c = self.clients
        shortest = min(c.header_timeout, c.body_timeout, c.keepalive_timeout, c.send_timeout)
        return min(1.0, max(0.05, shortest / 4))

    def sweep(self, now: float) -> None:
        """Drop the connections past a deadline; log the connections refused lately."""
        send_timeout = self.clients.send_timeout
        for conn in [c for c in self.connections if c.deadline <= now or c.write_paused]:
            if conn.deadline < 0:  # KEEPALIVE: idle since the last sweep, its time starts
                conn.deadline = now + conn.clients.keepalive_timeout
            if conn.write_paused:
                conn.check_send(now, send_timeout)
            elif conn.deadline <= now and not conn.holds:
                conn.expire()
        if self.refused and now - self.logged_at >= REFUSAL_LOG_SECONDS:
            log.warning("router: refused %d connections at the cap of %d per worker "
                        "(`clients.max_connections`)", self.refused, self.limit)
            self.refused, self.logged_at = 0, now

    async def sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval())
            self.sweep(loop.time())
