"""The native engine's flow cache and its own accept (the outbound fast path), without network
namespaces: the table's install / replace / flush, and a connection accepted by a worker on a
loopback listener with no entry comes to the event loop (EV_ACCEPTED) as the socket itself."""

from __future__ import annotations

import select
import socket
import time

from ztunnel_fast import _splice

EV_ACCEPTED = 9


def test_install_replace_and_flush():
    core = _splice.Core(2)
    try:
        core.flow_install(0x0A000001, 0x0A000002, 80, 7, 0, 1, b"p", b"", b"s")
        core.flow_install(0x0A000001, 0x0A000003, 80, 7, 1, 2, b"p", b"", b"")
        core.flow_install(0x0A000004, 0x0A000002, 80, 8, 1, 3, b"p", b";host=x", b"")
        core.flow_install(0x0A000001, 0x0A000002, 80, 8, 1, 4, b"q", b"", b"")  # replaces flow 1
        assert core.flow_stats == (3, 0, 0, 0)
        core.flow_flush(7)  # the entries riding connection 7
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
