"""zeroprefill.ports.free_port: ports of their own for servers started side by side."""

from __future__ import annotations

import socket

import pytest

from zeroprefill import ports


@pytest.fixture(autouse=True)
def fresh_ports(monkeypatch):
    monkeypatch.setattr(ports, "_handed_out", set())


def test_ports_come_from_below_the_ephemeral_range(monkeypatch):
    """vLLM once failed to bind its KV-events port (ZMQ "Address already in use"): the port had
    been free when the test picked it from the OS's ephemeral range, and a second server's own
    bind(0) was handed it before the first server bound it. Below that range nothing is handed
    out unasked."""
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (32768, 60999))
    picked = [ports.free_port() for _ in range(20)]
    assert len(set(picked)) == 20
    assert all(ports.FIRST_PORT <= port < 32768 for port in picked)
    with socket.socket() as sock:  # free when returned: a server can bind it on every address
        sock.bind(("", picked[0]))


def test_a_port_something_holds_is_passed_over(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (32768, 60999))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        offered = iter([taken, 23456])
        monkeypatch.setattr(ports._random, "randrange", lambda first, stop: next(offered))
        if not ports._bindable(23456):
            pytest.skip("port 23456 is in use on this machine")
        assert ports.free_port() == 23456


def test_without_room_below_the_range_the_os_picks(monkeypatch):
    monkeypatch.setattr(ports, "_os_pick", iter([41001, 41002]).__next__)
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (ports.FIRST_PORT + 10, 60999))
    assert ports.free_port() == 41001
    monkeypatch.setattr(ports, "ephemeral_range", lambda: None)  # not Linux: the range is unknown
    assert ports.free_port() == 41002


def test_servers_started_side_by_side_get_ports_of_their_own(monkeypatch):
    """The OS may offer a port again as soon as the probe closes: six servers started at once
    once got the same port twice (one then failed with "Address already in use")."""
    monkeypatch.setattr(ports, "ephemeral_range", lambda: None)
    monkeypatch.setattr(ports, "_os_pick", iter([41001, 41001, 41002, 41001, 41003]).__next__)
    assert [ports.free_port() for _ in range(3)] == [41001, 41002, 41003]


def test_the_ephemeral_range_is_read_from_the_kernel(monkeypatch, tmp_path):
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("32768\t60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", range_file)
    assert ports.ephemeral_range() == (32768, 60999)
    range_file.write_text("garbage\n")
    assert ports.ephemeral_range() is None
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "absent")
    assert ports.ephemeral_range() is None
