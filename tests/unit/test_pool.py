"""The HBONE connection pool and HTTP/2 driver, in process: real TLS and hyper-h2 over socket pairs.

No network: each "dial" is a socketpair whose far end is served by an in-process HBONE server
that answers CONNECT with 200 (or a status chosen by the test) and echoes the stream.
"""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address

import pytest
import uvloop

from h2.errors import ErrorCodes

from ztunnel_fast.errors import HttpStatus
from ztunnel_fast.hbone.connection import H2Settings, HboneConnection
from ztunnel_fast.hbone.pool import HbonePool, PoolKey
from ztunnel_fast.identity.ca import LocalCA, init_ca
from ztunnel_fast.identity.manager import WorkloadCertificate
from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.tls import handshake

TD = "cluster.local"
SLEEP = Identity(TD, "demo", "sleep")
HTTPBIN = Identity(TD, "demo", "httpbin")
OTHER = Identity(TD, "demo", "other")
HOP_A = (ip_address("198.18.0.2"), 15008)
HOP_B = (ip_address("198.18.0.3"), 15008)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    init_ca(d, TD)
    ca = LocalCA.load(d)
    return {i: WorkloadCertificate.build(ca.issue(i, 3600)) for i in (SLEEP, HTTPBIN, OTHER)}


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 30))


class Harness:
    """A pool whose connector dials in-process HBONE servers."""

    def __init__(self, certs, *, status=200, max_streams=100, idle_timeout=300.0, server_max_streams=200):
        self.certs = certs
        self.status = status
        self.dials: list[PoolKey] = []
        self.servers: list[HboneConnection] = []
        self.server_settings = H2Settings(max_concurrent_streams=server_max_streams)
        self.pool = HbonePool(self.connect, max_streams=max_streams, idle_timeout=idle_timeout)

    async def connect(self, key: PoolKey) -> HboneConnection:
        self.dials.append(key)
        c, s = socket.socketpair()
        c.setblocking(False)
        s.setblocking(False)
        server_cert = self.certs[key.dst_identities[0]]
        client_tls, server_tls = await asyncio.gather(
            handshake(c, self.certs[key.src_identity].client_context, server_side=False),
            handshake(s, server_cert.server_context, server_side=True),
        )
        server = HboneConnection(s, server_tls, client=False, settings=self.server_settings, on_request=self.serve)
        server.start()
        self.servers.append(server)
        conn = HboneConnection(c, client_tls, client=True, settings=H2Settings())
        conn.start()
        return conn

    async def serve(self, stream):
        if self.status != 200:
            stream.respond(self.status, end=True)
            return
        stream.respond(200)
        while True:
            data = await stream.read()
            if not data:
                stream.end()
                return
            await stream.write(data)
            stream.consumed()


def request(authority="198.18.0.2:80"):
    return [(":method", "CONNECT"), (":authority", authority)]


async def echo(stream, payload: bytes) -> bytes:
    await stream.write(payload)
    stream.end()
    out = bytearray()
    while True:
        data = await stream.read()
        if not data:
            return bytes(out)
        out += data
        stream.consumed()


def test_pool_key_is_order_insensitive_over_identities():
    assert PoolKey.of(SLEEP, [HTTPBIN, OTHER], HOP_A) == PoolKey.of(SLEEP, (OTHER, HTTPBIN, HTTPBIN), HOP_A)
    assert PoolKey.of(SLEEP, [HTTPBIN], HOP_A) != PoolKey.of(OTHER, [HTTPBIN], HOP_A)
    assert PoolKey.of(SLEEP, [HTTPBIN], HOP_A) != PoolKey.of(SLEEP, [HTTPBIN], HOP_B)
    assert PoolKey.of(SLEEP, [HTTPBIN], HOP_A) != PoolKey.of(SLEEP, [HTTPBIN, OTHER], HOP_A)


def test_streams_share_one_connection_per_key_and_keys_never_mix(certs):
    async def main():
        h = Harness(certs)
        key1 = PoolKey.of(SLEEP, [HTTPBIN], HOP_A)
        key2 = PoolKey.of(OTHER, [HTTPBIN], HOP_A)  # another source identity: another connection
        streams = await asyncio.gather(*(h.pool.open_stream(key1, request()) for _ in range(20)))
        results = await asyncio.gather(*(echo(s, bytes([i]) * 70_000) for i, s in enumerate(streams)))
        assert results == [bytes([i]) * 70_000 for i in range(20)]
        s2 = await h.pool.open_stream(key2, request())
        assert await echo(s2, b"x" * 10) == b"x" * 10
        assert h.dials == [key1, key2]
        assert len({s.conn for s in streams}) == 1 and s2.conn not in {s.conn for s in streams}
        h.pool.close()

    run(main())


def test_full_connection_makes_a_new_one(certs):
    async def main():
        h = Harness(certs, max_streams=3)
        key = PoolKey.of(SLEEP, [HTTPBIN], HOP_A)
        streams = [await h.pool.open_stream(key, request()) for _ in range(7)]
        conns = [s.conn for s in streams]
        assert len(set(conns)) == 3 and len(h.dials) == 3
        assert all(conns.count(c) <= 3 for c in set(conns))
        # a finished stream frees a slot: the next stream reuses a connection
        await echo(streams[0], b"a")
        await asyncio.sleep(0.05)
        s = await h.pool.open_stream(key, request())
        assert s.conn is conns[0] and len(h.dials) == 3
        h.pool.close()

    run(main())


def test_peer_max_concurrent_streams_caps_a_connection(certs):
    async def main():
        h = Harness(certs, max_streams=100, server_max_streams=2)
        key = PoolKey.of(SLEEP, [HTTPBIN], HOP_A)
        first = await h.pool.open_stream(key, request())
        await asyncio.sleep(0.05)  # the server's SETTINGS have arrived
        others = [await h.pool.open_stream(key, request()) for _ in range(3)]
        assert len({s.conn for s in [first, *others]}) == 2
        h.pool.close()

    run(main())


def test_goaway_connection_is_never_reused(certs):
    async def main():
        h = Harness(certs)
        key = PoolKey.of(SLEEP, [HTTPBIN], HOP_A)
        s1 = await h.pool.open_stream(key, request())
        h.servers[0].goaway()  # graceful: s1 may finish, no new streams on this connection
        await asyncio.sleep(0.05)
        assert s1.conn.goaway_received
        s2 = await h.pool.open_stream(key, request())
        assert s2.conn is not s1.conn and len(h.dials) == 2
        assert await echo(s1, b"still works") == b"still works"
        await asyncio.sleep(0.05)
        assert s1.conn.lost is not None  # closed once its last stream ended
        h.pool.close()

    run(main())


def test_non_200_raises_http_status(certs):
    async def main():
        h = Harness(certs, status=401)
        key = PoolKey.of(SLEEP, [HTTPBIN], HOP_A)
        with pytest.raises(HttpStatus) as err:
            await h.pool.open_stream(key, request())
        assert str(err.value) == "http status: 401 Unauthorized"
        # the connection itself stays usable for the next stream
        with pytest.raises(HttpStatus):
            await h.pool.open_stream(key, request())
        assert len(h.dials) == 1
        h.pool.close()

    run(main())


def test_idle_connections_are_released(certs):
    async def main():
        h = Harness(certs, idle_timeout=0.2)
        key = PoolKey.of(SLEEP, [HTTPBIN], HOP_A)
        s = await h.pool.open_stream(key, request())
        await echo(s, b"bye")
        conn = s.conn
        await asyncio.sleep(0.6)
        assert conn.lost is not None and h.pool.connections() == []
        await h.pool.open_stream(key, request())
        assert len(h.dials) == 2
        h.pool.close()

    run(main())


def test_flow_control_bounds_buffering_and_resumes(certs):
    """A reader that does not consume stalls the writer at the stream window, then resumes."""
    async def main():
        h = Harness(certs)
        key = PoolKey.of(SLEEP, [HTTPBIN], HOP_A)
        s = await h.pool.open_stream(key, request())
        payload = b"z" * (12 * 1024 * 1024)  # 3x the stream window
        writer = asyncio.ensure_future(s.write(payload))
        await asyncio.sleep(0.3)
        # the echo server is itself blocked writing back to us (we do not read): nothing finishes
        assert not writer.done()
        got = bytearray()
        async def reader():
            while len(got) < len(payload):
                data = await s.read()
                got.extend(data)
                s.consumed()
        await asyncio.gather(writer, reader())
        assert bytes(got) == payload
        h.pool.close()

    run(main())


def test_reset_streams_give_their_unread_bytes_back_to_the_connection_window(certs):
    """Streams reset with data still unread must not shrink the connection window for good:
    after many of them the pooled connection still carries a bulk transfer."""
    async def main():
        h = Harness(certs)
        key = PoolKey.of(SLEEP, [HTTPBIN], HOP_A)
        for _ in range(12):  # 12 x 2 MiB unread > the 16 MiB connection window
            s = await h.pool.open_stream(key, request())
            await s.write(b"q" * (2 * 1024 * 1024))  # echoed back to us, never read
            await asyncio.sleep(0.05)
            s.reset()
        await asyncio.sleep(0.1)
        s = await h.pool.open_stream(key, request())
        assert len(h.dials) == 1  # the same connection all along
        payload = b"w" * (8 * 1024 * 1024)
        assert await asyncio.wait_for(echo(s, payload), 20) == payload
        h.pool.close()

    run(main())


def test_an_error_goaway_is_sent_once_even_if_a_queued_read_runs_after_it(certs):
    """A read queued with call_soon (TLS still held plaintext) that runs after the error GOAWAY
    stopped reading must not make h2 raise again on the same bytes and send a second GOAWAY."""
    from h2.frame_buffer import FrameBuffer
    from OpenSSL import SSL
    from hyperframe.frame import GoAwayFrame, SettingsFrame

    async def main():
        c, s = socket.socketpair()
        c.setblocking(False)
        s.setblocking(False)
        client_tls, server_tls = await asyncio.gather(
            handshake(c, certs[SLEEP].client_context, server_side=False),
            handshake(s, certs[HTTPBIN].server_context, server_side=True),
        )
        server = HboneConnection(s, server_tls, client=False, settings=H2Settings(), on_request=None)
        server.start()
        oversized = (2 << 20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"  # a DATA header, 2 MiB
        client_tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize() + oversized)
        for _ in range(400):
            if server.goaway_sent:
                break
            await asyncio.sleep(0.005)
        assert server.goaway_sent
        client_tls.sendall(b"\x00" * 4096)  # the oversized frame's body keeps coming ...
        server._on_readable()  # ... and a read queued with call_soon runs (the close is 0.1 s away)
        await asyncio.sleep(0.3)
        received = b""
        for _ in range(20):
            try:
                data = client_tls.recv(65536)
            except SSL.WantReadError:
                await asyncio.sleep(0.01)
                continue
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
            if not data:
                break
            received += data
        buf = FrameBuffer(server=False)
        buf.max_frame_size = 1 << 24
        buf.add_data(received)
        goaways = [f for f in buf if isinstance(f, GoAwayFrame)]
        server.close()
        c.close()
        return goaways

    goaways = run(main())
    assert [g.error_code for g in goaways] == [ErrorCodes.FRAME_SIZE_ERROR]
