"""What the router keeps about one request while handling it, and how it answers it."""

from __future__ import annotations

import time
from collections.abc import Callable

from router.server import ClientConnection, Request
from router.store import Store
from router.tables import Limited, Tables
from router.usage import Usage

OVERHEAD_HEADER = b"x-modelstack-overhead-ms"


class Context:
    """Per-request bookkeeping: who asked for which model, what was answered, tokens used."""

    __slots__ = ("alias", "key_name", "limited", "model", "overhead_base", "render", "req",
                 "reservations", "sent", "status", "store", "tables", "usage", "user_name")

    def __init__(self, req: Request, tables: Tables) -> None:
        self.req = req
        self.tables = tables
        """The config as it was when the request came in."""
        self.model: str | None = None
        self.key_name = ""
        self.user_name = ""
        """The user holding the request's key, if it has one (a metrics label)."""
        self.status = 0
        self.sent = False
        """The status line went out: an error can no longer be answered."""
        self.usage = Usage()
        self.limited: tuple[Limited, ...] = ()
        """What the request was admitted against (its key, its user), to settle."""
        self.reservations: tuple[tuple[int, int], ...] = ()
        """(second, tokens reserved) of each of them, or one: the shared store's."""
        self.store: Store | None = None
        """The shared store that admitted the request, if one did."""
        self.overhead_base = 0.0
        """Seconds spent waiting on the upstream, subtracted from the overhead."""
        self.render: Callable[[bytes], tuple[bytes, bytes] | None] | None = None
        """Makes the answer the client asked for from the replica's buffered 2xx answer
        (`router.rendering`): (body, content type), or None to pass it on as it is."""
        self.alias: tuple[tuple[bytes, bytes], ...] = ()
        """The request named its model by an alias, which the replica does not know (it
        serves the model's name): the JSON `"model"` members to give the client back."""

    def named_as_asked(self, data: bytes) -> bytes:
        """`data` with the model's name in its `"model"` members put back to the alias the
        client asked for (answers and stream events, compact or spaced JSON)."""
        for served, asked in self.alias:
            if served in data:
                data = data.replace(served, asked)
        return data

    def overhead_header(self, now: float) -> bytes:
        ms = max(0.0, (now - self.req.started - self.overhead_base) * 1000)
        return b"%s: %.3f\r\n" % (OVERHEAD_HEADER, ms)

    def respond(self, conn: ClientConnection, status: int, body: bytes, content_type: bytes,
                extra: bytes = b"") -> None:
        """Answer the request whole; `extra` is more header lines."""
        self.status = status
        self.sent = True
        conn.respond(status, body, content_type, extra + self.overhead_header(time.monotonic()),
                     keep_alive=self.req.keep_alive)
