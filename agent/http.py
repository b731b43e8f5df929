"""The agent's HTTP connections: uvicorn's h11 protocol with the agent's own limits.

- Every answer the protocol gives itself is JSON in the API's error shape, like the app's:
  bytes that are not HTTP or a request head over `max_head` bytes get a JSON 400
  (uvicorn's own is `text/plain`). h11 bounds only a head that arrives in pieces; one
  that arrives whole in one read is measured here.
- At most `max_connections` open connections: one more is answered with a JSON 503 and
  closed before any of its bytes are read.
- A request must arrive, head and body, within `request_timeout_seconds` of its first
  byte (of the connection, for the first one): a client that sends slowly or stops
  half-way gets a JSON 408 and the connection is closed, so it cannot hold a socket.
  Idle keep-alive connections close after uvicorn's `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("stack-agent")


def error_response(status: int, reason: str, error: str, hint: str) -> bytes:
    """A whole HTTP/1.1 response in the API's error shape that closes the connection."""
    body = json.dumps({"error": error, "hint": hint}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


BAD_REQUEST = error_response(400, "Bad Request", "invalid HTTP request",
                             "send HTTP/1.1 with a head under 16 KiB.")
TOO_MANY = error_response(503, "Service Unavailable", "too many open connections",
                          "close idle connections; the agent serves the controller and "
                          "Prometheus only.")
TOO_SLOW = error_response(408, "Request Timeout", "the request did not arrive in time",
                          "send the whole request at once.")


def agent_protocol(max_connections: int, request_timeout: float,
                   max_head: int) -> type[H11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)` with these limits."""

    class AgentProtocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None
        refused = False
        # the start of the request whose head has not ended yet (bounded), None once it has
        head: bytes | None = b""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                self.refused = True
                log.warning("agent: refused a connection: %d open", len(self.connections))
                transport.write(TOO_MANY)
                transport.close()
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return
            if self.deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first byte of a new request on a kept-alive connection
            if self.conn.their_state is h11.IDLE and self.head is not None:
                self.head = (self.head + data)[:max_head + 4]
                end = self.head.find(b"\r\n\r\n")
                if (end < 0 and len(self.head) > max_head) or end > max_head:
                    self.send_400_response("request head too large")
                    return
                if end >= 0:
                    self.head = None  # this request's head is whole: stop measuring
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._disarm()
            self.head = b""  # measure the next request's head
            super().on_response_complete()

        def send_400_response(self, msg: str) -> None:
            self._disarm()
            self.transport.write(BAD_REQUEST)
            self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self.deadline = self.loop.call_later(request_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _too_slow(self) -> None:
            self.deadline = None
            if self.transport.is_closing():
                return
            started = self.cycle is not None and self.cycle.response_started
            if not started and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self.transport.write(TOO_SLOW)
            self.transport.close()

    return AgentProtocol

