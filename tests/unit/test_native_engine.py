"""The native engine in process: worker threads, plain<->plain splices, and (below) native HBONE
connections over socket pairs with real TLS, against the pure reference connection.

No network namespaces: plain legs are TCP connections on 127.0.0.1 or socket pairs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading

import pytest
import uvloop
from h2 import errors as h2_errors
from OpenSSL import SSL

from ztunnel_fast.engine import (
    base,
    native,
)

NativeEngine = native.NativeEngine


def run(coro, timeout=60):
    return uvloop.run(asyncio.wait_for(coro, timeout))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (non-blocking), like a real downstream/upstream."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    for s in (a, b):
        s.setblocking(False)
    return a, b


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected non-blocking Unix socket pair: a downstream and the plain leg it arrives on."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def close_all(*closeables) -> None:
    for c in closeables:
        c.close()


async def send_all_then_fin(loop, sock: socket.socket, payload: bytes) -> None:
    await loop.sock_sendall(sock, payload)
    sock.shutdown(socket.SHUT_WR)


async def read_to_eof(loop, sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        data = await loop.sock_recv(sock, 1 << 16)
        if not data:
            return bytes(out)
        out += data


def payload(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


# ---------------------------------------------------------------------------- plain <-> plain
def test_splice_moves_both_ways_with_half_close():
    async def main():
        loop = asyncio.get_running_loop()
        engine = NativeEngine(workers=2)
        client, plain = tcp_pair()
        upstream, server = tcp_pair()
        task = asyncio.ensure_future(engine.splice(plain, upstream, "t1"))
        up, down = payload(3 << 20, 1), payload(5 << 20, 2)
        # client sends and half-closes first; the server keeps sending after it saw the FIN
        await send_all_then_fin(loop, client, up)
        got_up = await read_to_eof(loop, server)
        await send_all_then_fin(loop, server, down)
        got_down = await read_to_eof(loop, client)
        completion = await task
        assert got_up == up and got_down == down
        assert (completion.sent, completion.received) == (len(up), len(down))
        assert completion.error is None and not completion.reset
        close_all(client, plain, upstream, server)
        engine.close()

    run(main())


def test_splice_many_tunnels_share_the_workers_without_threads():
    async def main():
        loop = asyncio.get_running_loop()
        engine = NativeEngine(workers=2)
        threads = threading.active_count()
        pairs = [(tcp_pair(), tcp_pair()) for _ in range(50)]
        tasks = [asyncio.ensure_future(engine.splice(p[1], u[0], f"t{i}")) for i, (p, u) in enumerate(pairs)]
        assert threading.active_count() == threads  # workers, not a thread per tunnel

        async def one(i, p, u):
            data = payload(200_000 + i, i)
            await send_all_then_fin(loop, p[0], data)
            echoed = await read_to_eof(loop, u[1])
            await send_all_then_fin(loop, u[1], echoed)
            return await read_to_eof(loop, p[0]) == data

        assert all(await asyncio.gather(*(one(i, p, u) for i, (p, u) in enumerate(pairs))))
        for c in await asyncio.gather(*tasks):
            assert c.error is None
        for p, u in pairs:
            for s in (*p, *u):
                s.close()
        engine.close()

    run(main())


def test_splice_reset_is_reported_as_reset():
    async def main():
        loop = asyncio.get_running_loop()
        engine = NativeEngine(workers=1)
        client, plain = tcp_pair()
        upstream, server = tcp_pair()
        task = asyncio.ensure_future(engine.splice(plain, upstream, "t"))
        await loop.sock_sendall(client, b"hello")
        assert await loop.sock_recv(server, 5) == b"hello"
        base.abort(server)  # RST from the upstream side
        await loop.sock_sendall(client, b"more")
        completion = await task
        assert completion.reset and completion.error and "os error" in completion.error
        for s in (client, plain, upstream):
            s.close()
        engine.close()

    run(main())


def test_splice_cancel_ends_promptly_and_lets_go_of_the_sockets():
    async def main():
        engine = NativeEngine(workers=1)
        client, plain = tcp_pair()
        upstream, server = tcp_pair()
        task = asyncio.ensure_future(engine.splice(plain, upstream, "t"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not engine._splices  # the completion arrived before CancelledError propagated
        close_all(client, plain, upstream, server)
        engine.close()

    run(main())


def test_engine_close_completes_open_splices():
    async def main():
        engine = NativeEngine(workers=2)
        client, plain = tcp_pair()
        upstream, server = tcp_pair()
        task = asyncio.ensure_future(engine.splice(plain, upstream, "t"))
        await asyncio.sleep(0.05)
        engine.close()
        completion = await task
        assert completion.reset
        close_all(client, plain, upstream, server)

    run(main())


def test_splice_works_on_unix_socket_pairs():
    async def main():
        loop = asyncio.get_running_loop()
        engine = NativeEngine(workers=1)
        a1, a2 = socket_pair()
        b1, b2 = socket_pair()
        task = asyncio.ensure_future(engine.splice(a2, b1, "t"))
        data = os.urandom(1 << 20)
        await send_all_then_fin(loop, a1, data)
        assert await read_to_eof(loop, b2) == data
        b2.shutdown(socket.SHUT_WR)
        assert await read_to_eof(loop, a1) == b""
        completion = await task
        assert completion.sent == len(data) and completion.error is None
        close_all(a1, a2, b1, b2)
        engine.close()

    run(main())


# ---------------------------------------------------------------------------- native HBONE
from ipaddress import ip_address

from ztunnel_fast.engine.pure import PureEngine
from ztunnel_fast.errors import HttpStatus, StreamReset
from ztunnel_fast.hbone.connection import ConnectionLost, H2Settings
from ztunnel_fast.identity.ca import LocalCA, init_ca
from ztunnel_fast.identity.manager import WorkloadCertificate
from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.tls import handshake

TD = "cluster.local"
SLEEP = Identity(TD, "demo", "sleep")
HTTPBIN = Identity(TD, "demo", "httpbin")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    init_ca(d, TD)
    ca = LocalCA.load(d)
    return {i: WorkloadCertificate.build(ca.issue(i, 3600)) for i in (SLEEP, HTTPBIN)}


async def tls_pair(certs):
    """A socket pair with TLS done on both ends (sleep as client, httpbin as server):
    (client socket, server socket, client TLS, server TLS)."""
    c, s = socket_pair()
    client_tls, server_tls = await asyncio.gather(
        handshake(c, certs[SLEEP].client_context, server_side=False),
        handshake(s, certs[HTTPBIN].server_context, server_side=True),
    )
    return c, s, client_tls, server_tls


def connect_request(authority="198.18.0.2:80"):
    return [(":method", "CONNECT"), (":authority", authority)]


async def echo_plain(loop, sock: socket.socket) -> int:
    """The app behind the server: echo until EOF, then FIN."""
    total = 0
    while True:
        data = await loop.sock_recv(sock, 1 << 18)
        if not data:
            sock.shutdown(socket.SHUT_WR)
            return total
        total += len(data)
        await loop.sock_sendall(sock, data)


class Pair:
    """A client engine and a server engine joined by one TLS socket pair; the server answers every
    CONNECT with `status` and, for 200, tunnels the stream to an in-process echo app."""

    def __init__(self, certs, client_engine, server_engine, *, status=200, settings=None):
        self.certs = certs
        self.client_engine = client_engine
        self.server_engine = server_engine
        self.status = status
        self.settings = settings or H2Settings()
        self.completions = []
        self.apps: list[socket.socket] = []
        self.server_tasks = []

    async def open(self):
        c, s, client_tls, server_tls = await tls_pair(self.certs)
        self.server = self.server_engine.connection(s, server_tls, client=False, settings=self.settings,
                                                    on_request=self.serve, name="server")
        self.server.start()
        self.client = self.client_engine.connection(c, client_tls, client=True, settings=self.settings,
                                                    name="client")
        self.client.start()
        return self

    async def serve(self, stream):
        loop = asyncio.get_running_loop()
        if self.status != 200:
            stream.respond(self.status, end=True)
            return
        plain, app = socket_pair()
        self.apps.append(app)
        stream.respond(200)
        echo = asyncio.ensure_future(echo_plain(loop, app))
        completion = await self.server_engine.tunnel(plain, stream, "srv")
        self.completions.append(completion)
        base.close_after(completion, plain)
        echo.cancel()

    async def stream(self):
        stream = self.client.start_stream(connect_request())
        await self.client.response(stream)
        return stream

    async def echo(self, payload: bytes) -> tuple[bytes, base.Completion]:
        """A downstream socket tunnelled through a new stream: send payload, FIN, read the echo."""
        loop = asyncio.get_running_loop()
        stream = await self.stream()
        down, plain = socket_pair()
        task = asyncio.ensure_future(self.client_engine.tunnel(plain, stream, "cli"))
        sender = asyncio.ensure_future(send_all_then_fin(loop, down, payload))
        got = await read_to_eof(loop, down)
        await sender
        completion = await task
        base.close_after(completion, plain)
        down.close()
        return got, completion

    def close(self):
        self.client.close()
        self.server.close()
        for app in self.apps:
            app.close()


ENGINE_PAIRS = ["native-native", "native-pure", "pure-native"]


def engines(kind: str, workers: int = 2):
    make = {"native": lambda: NativeEngine(workers=workers), "pure": PureEngine}
    client, server = kind.split("-")
    return make[client](), make[server]()


@pytest.mark.parametrize("kind", ENGINE_PAIRS)
def test_tunnel_echo_through_native_connections(certs, kind):
    async def main():
        ce, se = engines(kind)
        pair = await Pair(certs, ce, se).open()
        data = payload(3 << 20, 7)
        got, completion = await pair.echo(data)
        assert got == data
        assert (completion.sent, completion.received, completion.error) == (len(data), len(data), None)
        # several streams at once on the same connection, fair and intact
        datas = [payload(300_000 + 17 * i, i) for i in range(8)]
        results = await asyncio.gather(*(pair.echo(d) for d in datas))
        assert [r[0] for r in results] == datas
        assert all(c.error is None for c in pair.completions)
        pair.close()
        await asyncio.sleep(0.05)
        close_all(ce, se)

    run(main())


@pytest.mark.parametrize("kind", ENGINE_PAIRS)
def test_non_200_raises_http_status_and_connection_stays_usable(certs, kind):
    async def main():
        ce, se = engines(kind)
        pair = await Pair(certs, ce, se, status=503).open()
        with pytest.raises(HttpStatus) as err:
            await pair.stream()
        assert str(err.value) == "http status: 503 Service Unavailable"
        pair.status = 200
        got, _ = await pair.echo(b"still works")
        assert got == b"still works"
        pair.close()
        close_all(ce, se)

    run(main())


def test_64_mib_through_native_connections_makes_no_per_chunk_events(certs):
    """Both ends native: a 64 MiB echo is moved by the workers; the event loop hears a handful of
    events per tunnel (headers, completion, stream end), never one per chunk."""
    async def main():
        ce, se = engines("native-native")
        pair = await Pair(certs, ce, se).open()
        await pair.echo(b"warm up")
        before = ce.events_emitted + se.events_emitted
        data = payload(64 << 20, 3)
        got, completion = await pair.echo(data)
        after = ce.events_emitted + se.events_emitted
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert completion.sent == completion.received == len(data)
        assert after - before <= 12, after - before  # 64 MiB = 4096 chunks of 16 KiB: none of them
        pair.close()
        await asyncio.sleep(0.05)
        close_all(ce, se)

    run(main(), timeout=120)


@pytest.mark.parametrize("kind", ENGINE_PAIRS)
def test_half_close_server_first(certs, kind):
    """The app answers and closes its side first; the client keeps sending afterwards."""
    async def main():
        loop = asyncio.get_running_loop()
        ce, se = engines(kind)
        pair = await Pair(certs, ce, se).open()
        reply = payload(1 << 20, 9)
        request = payload(2 << 20, 10)
        received_by_app = asyncio.get_running_loop().create_future()

        async def serve(stream):
            plain, app = socket_pair()
            stream.respond(200)
            task = asyncio.ensure_future(se.tunnel(plain, stream, "srv"))
            await send_all_then_fin(loop, app, reply)
            received_by_app.set_result(await read_to_eof(loop, app))
            completion = await task
            base.close_after(completion, plain)
            app.close()

        pair.server.on_request = serve
        stream = await pair.stream()
        down, plain = socket_pair()
        task = asyncio.ensure_future(ce.tunnel(plain, stream, "cli"))
        assert await read_to_eof(loop, down) == reply  # server FIN arrived while we still send
        await send_all_then_fin(loop, down, request)
        assert await received_by_app == request
        completion = await task
        assert completion.error is None and completion.received == len(reply)
        base.close_after(completion, plain)
        down.close()
        pair.close()
        close_all(ce, se)

    run(main())


@pytest.mark.parametrize("kind", ENGINE_PAIRS)
def test_app_reset_reaches_the_client_as_reset(certs, kind):
    async def main():
        loop = asyncio.get_running_loop()
        ce, se = engines(kind)
        pair = await Pair(certs, ce, se).open()

        async def serve(stream):
            plain, app = tcp_pair()  # TCP: a unix socket cannot be reset
            stream.respond(200)
            task = asyncio.ensure_future(se.tunnel(plain, stream, "srv"))
            await loop.sock_recv(app, 10)
            base.abort(app)  # the app resets its connection
            completion = await task
            assert completion.reset
            base.close_after(completion, plain)

        pair.server.on_request = serve
        stream = await pair.stream()
        down, plain = tcp_pair()
        task = asyncio.ensure_future(ce.tunnel(plain, stream, "cli"))
        await loop.sock_sendall(down, b"hello")
        completion = await task
        assert completion.reset and "stream reset" in completion.error, completion
        base.close_after(completion, plain)
        with pytest.raises(ConnectionResetError):
            while await loop.sock_recv(down, 100):
                pass
        down.close()
        pair.server.on_request = pair.serve
        got, _ = await pair.echo(b"the connection survives")
        assert got == b"the connection survives"
        pair.close()
        close_all(ce, se)

    run(main())


def test_cancelled_tunnel_resets_the_stream_and_lets_go(certs):
    async def main():
        loop = asyncio.get_running_loop()
        ce, se = engines("native-native")
        pair = await Pair(certs, ce, se).open()
        stream = await pair.stream()
        down, plain = socket_pair()
        task = asyncio.ensure_future(ce.tunnel(plain, stream, "cli"))
        await loop.sock_sendall(down, b"x" * 1000)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not ce._tunnels  # completion received before CancelledError propagated
        await asyncio.sleep(0.1)
        assert pair.completions and pair.completions[-1].reset  # the server saw RST_STREAM
        assert not pair.client.streams and not pair.server.streams
        plain.close()
        down.close()
        pair.close()
        close_all(ce, se)

    run(main())


@pytest.mark.parametrize("kind", ENGINE_PAIRS)
def test_graceful_goaway_lets_open_streams_finish(certs, kind):
    async def main():
        loop = asyncio.get_running_loop()
        ce, se = engines(kind)
        pair = await Pair(certs, ce, se).open()
        stream = await pair.stream()
        down, plain = socket_pair()
        task = asyncio.ensure_future(ce.tunnel(plain, stream, "cli"))
        await loop.sock_sendall(down, b"before")
        pair.server.goaway()
        await asyncio.sleep(0.1)
        assert pair.client.goaway_received and not pair.client.can_open(100)
        await send_all_then_fin(loop, down, b" and after")
        assert await read_to_eof(loop, down) == b"before and after"
        completion = await task
        assert completion.error is None
        base.close_after(completion, plain)
        down.close()
        await asyncio.wait_for(asyncio.shield(pair.client.closed), 2)  # closed once its last stream ended
        await asyncio.wait_for(asyncio.shield(pair.server.closed), 2)
        close_all(ce, se)

    run(main())


def test_a_connection_the_fast_path_shares_gets_its_stream_ids_from_the_worker(certs):
    """Once the fast path shares a pooled connection (fast_enabled), the worker picks the id of
    every stream the event loop opens: the ids go on ascending from those opened before, tunnels
    work on them, a stream reset before its id came is reset once it comes (the server sees the
    RST_STREAM), and the pool's idle release of the connection is a GOAWAY the worker closes on."""
    async def main():
        ce, se = engines("native-native")
        pair = await Pair(certs, ce, se).open()
        conn = pair.client
        got, _ = await pair.echo(b"before sharing")  # stream 1: the id chosen here
        assert got == b"before sharing"
        conn.fast_enabled = True  # as FastPath._share: the command goes before any worker uses it
        ce.core.fast_enable(conn.worker, conn.id, 100)
        early = conn.start_stream(connect_request())
        assert early.id == 0 and conn.active_streams == 1  # waiting for its id, counted meanwhile
        early.reset()  # before its id came: sent with it
        datas = [payload(200_000 + i, i) for i in range(3)]
        results = await asyncio.gather(*(pair.echo(d) for d in datas))
        assert [r[0] for r in results] == datas and all(r[1].error is None for r in results)
        await asyncio.sleep(0.1)
        assert early.id == 3 and early.reset_code == h2_errors.ErrorCodes.CANCEL
        assert conn.streams_opened == 5 and not conn._opening and not conn.streams  # 5, 7, 9 ended too
        assert not pair.server.streams  # stream 3 too: the reset reached the server
        # the four echoes ended cleanly; stream 3's tunnel, if it started before its reset came, was reset
        assert len([c for c in pair.completions if not c.reset]) == 4 and len(pair.completions) <= 5
        conn.close_idle()  # the pool's idle timeout: GOAWAY, the worker closes it with no streams left
        assert conn.goaway_sent
        await asyncio.wait_for(asyncio.shield(conn.closed), 2)
        await asyncio.wait_for(asyncio.shield(pair.server.closed), 2)  # the client's GOAWAY, then its close
        assert pair.server.goaway_received
        pair.close()
        close_all(ce, se)

    run(main())


def test_data_before_attach_is_buffered_within_the_window(certs):
    """The peer may send before the tunnel is attached; no more than the stream window is held,
    and nothing is lost once attached."""
    async def main():
        loop = asyncio.get_running_loop()
        ce, se = engines("pure-native")
        pair = await Pair(certs, ce, se).open()
        attach = loop.create_future()

        async def serve(stream):
            stream.respond(200)
            plain = await attach
            completion = await se.tunnel(plain, stream, "srv")
            base.close_after(completion, plain)

        pair.server.on_request = serve
        stream = await pair.stream()
        data = payload(12 << 20, 5)  # 3x the stream window
        writer = asyncio.ensure_future(stream.write(data))
        await asyncio.sleep(0.3)
        assert not writer.done()  # flow control holds the writer at the window
        plain, app = socket_pair()
        attach.set_result(plain)
        reader = asyncio.ensure_future(read_to_eof(loop, app))
        await writer
        stream.end()
        assert await reader == data
        app.close()
        pair.close()
        close_all(ce, se)

    run(main())


def test_pool_over_native_connections(certs):
    """The pool's rules hold with native connections: streams share a connection, the peer's
    SETTINGS_MAX_CONCURRENT_STREAMS caps it, GOAWAY retires it, idle connections are released."""
    from ztunnel_fast.hbone.pool import HbonePool, PoolKey

    async def main():
        ce, se = engines("native-native")
        pairs: list[Pair] = []

        async def connect(key):
            pair = await Pair(certs, ce, se, settings=H2Settings(max_concurrent_streams=3)).open()
            pairs.append(pair)
            return pair.client

        pool = HbonePool(connect, max_streams=100, idle_timeout=0.3)
        key = PoolKey.of(SLEEP, [HTTPBIN], (ip_address("198.18.0.2"), 15008))
        first = await pool.open_stream(key, connect_request())
        await asyncio.sleep(0.05)  # the server's SETTINGS (3 streams) have arrived
        others = [await pool.open_stream(key, connect_request()) for _ in range(4)]
        conns = {s.conn for s in [first, *others]}
        assert len(conns) == 2 and len(pairs) == 2
        for s in [first, *others]:
            s.reset()
        await asyncio.sleep(0.05)
        assert all(not c.streams for c in conns)
        pairs[0].server.goaway()
        await asyncio.sleep(0.05)
        assert pairs[0].client.lost is not None  # GOAWAY with no streams: closed
        s = await pool.open_stream(key, connect_request())
        assert s.conn is pairs[1].client
        s.reset()
        await asyncio.sleep(0.8)
        assert pool.connections() == []  # idle: released
        pool.close()
        for p in pairs:
            p.close()
        close_all(ce, se)

    run(main())


def test_connection_refused_by_peer_fails_the_first_stream_instead_of_hanging(certs):
    """The server closes right after the handshake (as a TLS 1.3 server rejecting our certificate
    does): the stream's response fails with the connection's error."""
    async def main():
        engine = NativeEngine(workers=1)
        c, s, client_tls, _server_tls = await tls_pair(certs)
        conn = engine.connection(c, client_tls, client=True, settings=H2Settings())
        conn.start()
        stream = conn.start_stream(connect_request())
        s.close()
        with pytest.raises((ConnectionLost, StreamReset)):
            await asyncio.wait_for(conn.response(stream), 5)
        assert await asyncio.wait_for(conn.closed, 5) is not None
        engine.close()

    run(main())


def test_keepalive_pings_are_answered_and_a_silent_peer_is_dropped(certs, monkeypatch, caplog):
    """PING every interval; acks keep the connection; a peer that stops answering is dropped after
    the timeout (reference 3.1: 10 s / 20 s; shortened here)."""
    monkeypatch.setattr(native, "PING_INTERVAL", 0.1)
    monkeypatch.setattr(native, "PING_TIMEOUT", 0.3)

    async def main():
        ce, se = engines("native-native")
        pair = await Pair(certs, ce, se).open()
        await asyncio.sleep(1.0)
        assert pair.client.lost is None and pair.server.lost is None  # pings acked both ways
        got, _ = await pair.echo(b"alive")
        assert got == b"alive"
        pair.close()

        # a peer that completes TLS, then never reads or answers again
        c, s, client_tls, _server_tls = await tls_pair(certs)
        conn = ce.connection(c, client_tls, client=True, settings=H2Settings(), name="silent-peer")
        conn.start()
        error = await asyncio.wait_for(conn.closed, 5)
        assert isinstance(error, ConnectionLost) and "keepalive" in str(error)
        s.close()
        close_all(ce, se)

    run(main())
    assert "silent-peer: no PING ack" in caplog.text


def test_protocol_error_from_a_peer_ends_only_that_connection(certs, caplog):
    """A peer violating HTTP/2 (here: an oversized frame header) gets GOAWAY FRAME_SIZE_ERROR and is
    closed; the engine and its other connections keep working."""
    async def main():
        ce, se = engines("native-native")
        good = await Pair(certs, ce, se).open()
        c, s, client_tls, server_tls = await tls_pair(certs)
        bad = se.connection(s, server_tls, client=False, settings=H2Settings(), on_request=good.serve, name="bad-peer")
        bad.start()
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
        client_tls.sendall(preface + bytes.fromhex("ffffff000000000001"))
        error = await asyncio.wait_for(bad.closed, 5)
        assert isinstance(error, ConnectionLost)
        received = b""
        while True:  # read what the server sent until it closes
            await asyncio.sleep(0.01)
            try:
                chunk = client_tls.recv(65536)
            except SSL.WantReadError:
                continue
            except (SSL.Error, OSError):
                break
            if not chunk:
                break
            received += chunk
        assert bytes.fromhex("0000000000000006") in received  # GOAWAY last=0 FRAME_SIZE_ERROR
        got, _ = await good.echo(b"others unharmed")
        assert got == b"others unharmed"
        good.close()
        c.close()
        close_all(ce, se)

    run(main())
    assert "bad-peer: closing connection, peer violated HTTP/2" in caplog.text
    assert "FRAME_SIZE_ERROR" in caplog.text


def test_a_stalled_stream_does_not_stall_its_connection(certs):
    """Backpressure is per stream: a tunnel whose downstream stops reading holds at most its stream
    window; another tunnel on the same connection keeps moving at full speed."""
    async def main():
        loop = asyncio.get_running_loop()
        ce, se = engines("native-native", workers=1)
        pair = await Pair(certs, ce, se).open()
        stalled = await pair.stream()
        down, plain = socket_pair()
        task = asyncio.ensure_future(ce.tunnel(plain, stalled, "stalled"))
        # 16 MiB sent; the echo comes back but `down` never reads it
        sender = asyncio.ensure_future(loop.sock_sendall(down, payload(16 << 20, 1)))
        await asyncio.sleep(0.5)
        data = payload(32 << 20, 2)
        got, completion = await asyncio.wait_for(pair.echo(data), 30)
        assert got == data and completion.error is None
        assert stalled.conn is pair.client and len(pair.client.streams) == 1
        sender.cancel()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        close_all(down, plain)
        pair.close()
        close_all(ce, se)

    run(main())
