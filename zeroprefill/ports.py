"""A free loopback TCP port: for a server, a rendezvous or a test started on this machine."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the OS picks it; another process may
    take it before the caller binds it, so start what needs it right away)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
