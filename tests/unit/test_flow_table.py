"""The native engine's flow cache and its own accept (the outbound fast path), without network
namespaces: the table's install / replace / flush, and a connection accepted by a worker on a
loopback listener with no entry comes to the event loop (EV_ACCEPTED) as the socket itself."""

from __future__ import annotations

import select
import socket
import time
from ipaddress import ip_address

import pytest

from ztunnel_fast import _splice
from ztunnel_fast.proxy.flowcache import addr16

A1, A2, A3, A4 = (addr16(ip_address(f"10.0.0.{i}")) for i in range(1, 5))

EV_ACCEPTED = 9


def test_install_replace_and_flush():
    core = _splice.Core(2)
    try:
        core.flow_install(A1, A2, 80, 7, 0, 1, b"p", b"", b"s")
        core.flow_install(A1, A3, 80, 7, 1, 2, b"p", b"", b"")
        core.flow_install(A4, A2, 80, 8, 1, 3, b"p", b";host=x", b"")
        core.flow_install(A1, A2, 80, 8, 1, 4, b"q", b"", b"")  # replaces flow 1
        v6 = addr16(ip_address("fd00::1"))
        core.flow_install(v6, A2, 80, 7, 1, 5, b"p", b"", b"")  # IPv6: the same keyspace, another class
        assert core.flow_stats == (4, 0, 0, 0)
        core.flow_flush(7)  # the entries riding connection 7
        assert core.flow_stats == (2, 0, 0, 0)
        with pytest.raises(ValueError):  # addresses are 16 bytes
            core.flow_install(ip_address("10.0.0.1").packed, A2, 80, 7, 1, 6, b"p", b"", b"")
        assert core.flow_stats == (2, 0, 0, 0)
        core.flow_flush()  # a state change: everything, and one more flush counted
        assert core.flow_stats == (0, 0, 0, 1)
    finally:
        core.stop()


def test_a_worker_accepts_and_hands_a_miss_over_as_the_socket():
    core = _splice.Core(2)
    lsock = socket.socket()
    client = socket.socket()
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        lsock.setblocking(False)
        core.listen(lsock.fileno(), (180, 180, 9))
        client.connect(lsock.getsockname())
        events, deadline = [], time.monotonic() + 10
        while not events and time.monotonic() < deadline:
            select.select([core.event_fd], [], [], 0.5)
            events = [e for e in core.poll() if e[0] == EV_ACCEPTED]
        assert len(events) == 1
        accepted = socket.socket(fileno=events[0][7])
        try:
            assert accepted.getpeername() == client.getsockname()
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            client.sendall(b"ping")
            accepted.settimeout(5)
            assert accepted.recv(4) == b"ping"
        finally:
            accepted.close()
        assert core.flow_stats[1:3] == (0, 1)  # handed to the event loop
        core.unlisten()
    finally:
        core.stop()
        client.close()
        lsock.close()


def test_entries_are_per_listener_and_flushed_per_listener():
    """In-pod mode: the same addresses on two pods' listeners are two classes."""
    core = _splice.Core(2)
    try:
        core.flow_install(A1, A2, 80, 7, 0, 1, b"p", b"", b"", 2)
        core.flow_install(A1, A2, 80, 8, 1, 2, b"p", b"", b"", 3)  # another pod: no replace
        core.flow_install(A1, A3, 80, 8, 1, 3, b"p", b"", b"", 3)
        assert core.flow_stats == (3, 0, 0, 0)
        core.flow_flush_listener(3)  # pod 3 removed
        assert core.flow_stats == (1, 0, 0, 0)
        core.flow_flush_listener(3)
        assert core.flow_stats == (1, 0, 0, 0)
    finally:
        core.stop()


def _accepted(core, timeout=10.0):
    events, deadline = [], time.monotonic() + timeout
    while not events and time.monotonic() < deadline:
        select.select([core.event_fd], [], [], 0.2)
        events = [e for e in core.poll() if e[0] == EV_ACCEPTED]
    return events


def test_two_listeners_name_themselves_and_a_shut_down_one_is_dropped_by_the_workers():
    """Each miss carries its listener id (EV_ACCEPTED's sid); shutting a listener down stops the
    kernel listening at once although the workers hold dups, and the workers drop their dups
    (EPOLLHUP, then CMD_UNLISTEN) while the other listener keeps being served."""
    core = _splice.Core(2)
    socks = [socket.socket() for _ in range(2)]
    clients = []
    try:
        for lid, s in zip((5, 9), socks):
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            s.setblocking(False)
            core.listen(s.fileno(), (180, 180, 9), lid)
        for s in socks:
            c = socket.socket()
            c.connect(s.getsockname())
            clients.append(c)
            events = _accepted(core)
            assert len(events) == 1
            assert events[0][3] == (5 if s is socks[0] else 9)  # sid: the listener
            socket.socket(fileno=events[0][7]).close()
        port = socks[0].getsockname()
        socks[0].shutdown(socket.SHUT_RD)
        c = socket.socket()
        clients.append(c)
        try:
            c.connect(port)
            raise AssertionError("connected to a listener that was shut down")
        except ConnectionRefusedError:
            pass
        core.unlisten(5)
        # the other listener is still served by the workers
        c = socket.socket()
        clients.append(c)
        c.connect(socks[1].getsockname())
        events = _accepted(core)
        assert [e[3] for e in events] == [9]
        socket.socket(fileno=events[0][7]).close()
    finally:
        core.stop()
        for c in clients:
            c.close()
        for s in socks:
            s.close()
