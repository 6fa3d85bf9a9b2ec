"""proxy.sockets.close_gracefully on loopback TCP: our last bytes (a TLS alert, a GOAWAY) reach a
peer whose own bytes we never read, followed by a FIN, never an RST; the drain is bounded."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ztunnel_fast.proxy.sockets import close_gracefully

LAST_WORDS = b"\x15\x03\x03\x00\x02\x02\x30"  # shaped like a TLS alert record; any bytes would do
UNREAD = 64 * 1024  # bytes the peer sent that the closing side never read


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
    server.setblocking(False)
    return server, client


def _read_to_end(client: socket.socket) -> tuple[bytes, str]:
    client.settimeout(10)
    got = bytearray()
    try:
        while chunk := client.recv(65536):
            got += chunk
    except ConnectionResetError:
        return bytes(got), "reset"
    return bytes(got), "eof"


@pytest.mark.parametrize("graceful", [True, False])
def test_last_words_arrive_before_a_fin_despite_unread_input(graceful):
    server, client = _pair()
    try:
        client.sendall(b"x" * UNREAD)  # the peer's leftovers, never read by the server
        server.sendall(LAST_WORDS)

        async def close() -> None:
            if graceful:
                await close_gracefully(server, drain_timeout=5.0)
            else:
                server.close()

        async def both() -> tuple[bytes, str]:
            closing = asyncio.create_task(close())
            result = await asyncio.to_thread(_read_to_end, client)
            client.close()  # the peer reads our last words and closes: the drain ends
            await closing
            return result

        got, end = asyncio.run(both())
        if graceful:
            assert (got, end) == (LAST_WORDS, "eof")
        else:  # the defect close_gracefully exists for: unread input turns close() into an RST
            assert end == "reset"
    finally:
        server.close()
        client.close()


def test_the_drain_is_bounded_in_bytes():
    """A peer that keeps sending does not keep the socket open: after drain_bytes it is closed."""
    server, client = _pair()
    client.setblocking(False)
    try:
        async def run() -> int:
            closing = asyncio.create_task(close_gracefully(server, drain_bytes=256 * 1024, drain_timeout=60.0))
            sent = 0
            while not closing.done() and sent < 64 * 1024 * 1024:  # bounded: the test's own cap
                try:
                    sent += client.send(b"y" * 65536)
                except BlockingIOError:
                    pass
                except OSError:
                    break
                await asyncio.sleep(0)
            await asyncio.wait_for(closing, 60)
            return sent

        sent = asyncio.run(run())
        assert server.fileno() == -1 and sent < 64 * 1024 * 1024
    finally:
        server.close()
        client.close()
