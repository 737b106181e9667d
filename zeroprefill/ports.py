"""A free loopback TCP port: for a server, a rendezvous or a test started on this machine."""

from __future__ import annotations

import socket
import threading

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the OS picks it; another process may
    take it before the caller binds it, so start what needs it right away).

    Never the same port twice in one process: the OS may offer a port again as soon as the
    probe closes, so servers started side by side, none bound yet, could otherwise share one."""
    with _handed_out_lock:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
