"""A free TCP port: for a server, a rendezvous or a test started on this machine.

A port found free can be taken by another process before the caller binds it. The usual
taker is any process asking the OS for a port of its own (``bind(("", 0))``; vLLM's engine
and ZMQ sockets, torch.distributed, a second server's internals): the OS answers from its
ephemeral range (Linux: ``/proc/sys/net/ipv4/ip_local_port_range``, 32768-60999 by default).
So where the range is known and leaves room below it, :func:`free_port` picks from below it,
where nothing is handed out unasked; elsewhere it takes a port the OS picks.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FIRST_PORT = 20000  # below it lie the ports common services are set to listen on
MIN_ROOM = 1000  # fewer candidates than this below the ephemeral range: let the OS pick
TRIES = 64

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()
_random = random.SystemRandom()  # not the global generator: tests seed that, and processes share seeds


def ephemeral_range() -> tuple[int, int] | None:
    """``(first, last)`` of the ports the OS hands out for ``bind(0)``; ``None`` where unknown."""
    try:
        first, last = (int(word) for word in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return None
    return first, last


def _bindable(port: int) -> bool:
    """Whether nothing holds ``port`` on any local address (a bind to all of them succeeds)."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def _os_pick() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port() -> int:
    """A port that nothing listens on now, below the OS's ephemeral range where there is room.

    Never the same port twice in one process: servers started side by side, none bound yet,
    could otherwise share one. Start what needs the port right away: a process that binds a
    port of its own choosing can still take it first.
    """
    with _handed_out_lock:
        ephemeral = ephemeral_range()
        if ephemeral is not None and ephemeral[0] - FIRST_PORT >= MIN_ROOM:
            for _ in range(TRIES):
                port = _random.randrange(FIRST_PORT, ephemeral[0])
                if port not in _handed_out and _bindable(port):
                    _handed_out.add(port)
                    return port
        while True:  # no room below the range, or every try was taken: the OS picks
            port = _os_pick()
            if port not in _handed_out:
                _handed_out.add(port)
                return port
