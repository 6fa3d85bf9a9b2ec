"""The native engine's batched TLS byte path (memory BIOs swapped in for the socket BIO at adoption):
what the hand-over must keep, and that the unbatched fallback (bindings without the BIO functions)
moves the same bytes.  In process, over socket pairs with real TLS; the peer is the pure twin, an
independent implementation of the same protocol.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from OpenSSL import SSL

from tests.unit.test_native_engine import (  # noqa: F401 - certs: the fixture
    ENGINE_PAIRS,
    HTTPBIN,
    SLEEP,
    Pair,
    certs,
    engines,
    payload,
    run,
)
from ztunnel_fast import _splice
from ztunnel_fast.engine import ssl_bridge
from ztunnel_fast.engine.native import NativeEngine
from ztunnel_fast.engine.pure import PureEngine
from ztunnel_fast.tls import handshake
from ztunnel_fast.tls.handshake import _ready

REQUIRED = 7  # the addresses set_ssl_functions needs; the memory BIO ones follow



@pytest.fixture
def unbatched():
    """Connections adopted meanwhile keep pyOpenSSL's socket BIO (as with bindings lacking BIOs)."""
    _splice.set_ssl_functions(*ssl_bridge.functions()[:REQUIRED])
    try:
        yield
    finally:
        _splice.set_ssl_functions(*ssl_bridge.functions())


def test_the_bridge_finds_every_memory_bio_function():
    # with these bindings the batched path is the one in use (an empty set would silently fall back)
    assert len(ssl_bridge.BIO_ADDRESSES) == len(ssl_bridge.functions()) - REQUIRED
    assert all(ssl_bridge.functions())


@pytest.mark.parametrize("kind", ENGINE_PAIRS)
def test_unbatched_fallback_moves_the_same_bytes(certs, kind, unbatched):
    async def main():
        ce, se = engines(kind)
        pair = await Pair(certs, ce, se).open()
        for size in (1, 16 * 1024 + 1, 3 << 20):
            data = payload(size, size)
            got, completion = await pair.echo(data)
            assert got == data and (completion.sent, completion.received, completion.error) == (size, size, None)
        pair.close()
        await asyncio.sleep(0.05)
        for e in (ce, se):
            e.close()

    run(main())


class PeekingPair(Pair):
    """The server's pyOpenSSL connection reads (peeks) the client's first records before the native
    engine adopts it: that plaintext sits in the SSL*, not in the socket, at the BIO swap."""

    async def open(self):
        c, s = socket.socketpair()
        c.setblocking(False)
        s.setblocking(False)
        client_tls, server_tls = await asyncio.gather(
            handshake(c, self.certs[SLEEP].client_context, server_side=False),
            handshake(s, self.certs[HTTPBIN].server_context, server_side=True),
        )
        self.client = self.client_engine.connection(c, client_tls, client=True, settings=self.settings, name="client")
        self.client.start()  # the preface and SETTINGS leave now
        loop = asyncio.get_running_loop()
        for _ in range(100):  # bounded: the preface arrives within a few event-loop turns
            await _ready(loop, s.fileno(), writing=False)
            try:
                self.peeked = server_tls.recv(64, socket.MSG_PEEK)  # SSL_peek: the record's plaintext stays buffered
                break
            except SSL.WantReadError:  # a record not complete yet
                continue
        self.server = self.server_engine.connection(s, server_tls, client=False, settings=self.settings,
                                                    on_request=self.serve, name="server")
        self.server.start()
        return self


def test_plaintext_the_ssl_already_holds_at_adoption_is_not_lost(certs):
    async def main():
        se, ce = NativeEngine(workers=1), PureEngine()
        pair = await PeekingPair(certs, ce, se).open()
        assert pair.peeked.startswith(b"PRI * HTTP/2.0")  # the preface was in the SSL* at the swap
        data = payload(1 << 20, 3)
        got, completion = await pair.echo(data)
        assert got == data and completion.error is None
        pair.close()
        await asyncio.sleep(0.05)
        for e in (ce, se):
            e.close()

    run(main())
