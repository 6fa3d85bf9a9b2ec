"""proxy.sockets.connect_numeric: the upstream connect without uvloop's getaddrinfo hand-off.
Loopback only; every socket is closed; no timing thresholds."""

from __future__ import annotations

import asyncio
import errno
import socket
import subprocess
import sys
import textwrap

import pytest
import uvloop

from ztunnel_fast.proxy.sockets import connect_numeric


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv


@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_connects_and_carries_bytes(runner):
    srv = _listener()

    async def go():
        loop = asyncio.get_running_loop()
        s = socket.socket()
        s.setblocking(False)
        try:
            await connect_numeric(loop, s, srv.getsockname())
            peer, _ = srv.accept()
            with peer:
                await loop.sock_sendall(s, b"ping")
                assert peer.recv(4) == b"ping"
            return s.getpeername()
        finally:
            s.close()

    try:
        assert runner(go()) == srv.getsockname()
    finally:
        srv.close()


@pytest.mark.parametrize("runner", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_refused_raises_connection_refused_and_leaves_no_writer(runner):
    srv = _listener()
    address = srv.getsockname()
    srv.close()  # nothing listens there now

    async def go():
        loop = asyncio.get_running_loop()
        s = socket.socket()
        s.setblocking(False)
        try:
            with pytest.raises(ConnectionRefusedError) as info:
                await connect_numeric(loop, s, address)
            assert (info.value.errno, info.value.strerror) == (errno.ECONNREFUSED, "Connection refused")
            if not isinstance(loop, uvloop.Loop):  # (uvloop's remove_writer answers None either way)
                assert loop.remove_writer(s.fileno()) is False  # no writer left behind on the fd
        finally:
            s.close()

    runner(go())


def test_uvloop_starts_no_resolver_threads():
    """uvloop's sock_connect resolves numeric addresses on libuv's thread pool; this one must not
    (run in a fresh interpreter: another test may have started the pool in this one)."""
    script = textwrap.dedent("""
        import asyncio, os, socket, uvloop
        from ztunnel_fast.proxy.sockets import connect_numeric
        async def go():
            srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
            for _ in range(3):
                s = socket.socket(); s.setblocking(False)
                await connect_numeric(asyncio.get_running_loop(), s, srv.getsockname())
                srv.accept()[0].close(); s.close()
            srv.close()
        uvloop.run(go())
        print(",".join(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert "libuv-worker" not in out.stdout, out.stdout
