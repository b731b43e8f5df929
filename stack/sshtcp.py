"""SSH connections without the Nagle / delayed-ACK stalls of small packets.

    transport(sock, **kwargs) -> paramiko.Transport    (paramiko's `transport_factory`)

paramiko sets no socket options, and an SSH exchange is many small packets each waiting
for the other side's answer: with Nagle's algorithm on one side and delayed ACKs on the
other, a small packet can wait up to 40 ms (Linux's minimum delayed-ACK timeout) for an
ACK. Measured on a loopback host: the handshake took 77 ms instead of 23 ms, and running
`true` 49 ms instead of 5 ms. Both sides contribute:

- this side's packets: `TCP_NODELAY` sends each SSH packet at once (paramiko writes whole
  packets, so this costs no extra segments);
- sshd's packets: sshd disables Nagle only for interactive (pty) sessions, so after it
  answered an exec request its next small packet (the exit status) waits for our ACK.
  `TCP_QUICKACK` makes the kernel acknowledge at once; Linux drops back to delayed ACKs
  on its own, so it is set again before every read.

Non-TCP transports (a ProxyCommand from the user's SSH config) are passed through as they
are. pyinfra hands `transport` to paramiko through the `ssh_paramiko_connect_kwargs` host
data (stack.observe sets it on every host).
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from paramiko import Transport

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _QuickAckSocket:
    """A TCP socket that acknowledges every read at once (everything else delegated)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv(self, size: int) -> bytes:
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):  # closed under us: recv reports it
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return self._sock.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def transport(sock: Any, **kwargs: Any) -> Transport:
    """paramiko's Transport over `sock`, with Nagle off and immediate ACKs on TCP."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = _QuickAckSocket(sock)
    return Transport(sock, **kwargs)


__all__ = ["transport"]
