"""The native engine's inbound flow cache (_splice_inflow.pxi), in process: the table's install /
replace / flush, and a worker answering a peer's CONNECT from an installed verdict over a real TLS
socket pair (the client is the pure twin): it dials the app itself, answers 200, splices, and
reports EV_INBOUND_OPEN then the completion; a request with a field the verdict did not cover, a
refused dial and a flushed table all hand the CONNECT to the event loop's path (on_request).
In-pod: a pod's verdict has the socket made inside the pod's namespace fd (a namespace the worker
cannot enter hands the CONNECT back), and a dial in flight when its pod is flushed opens nothing."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address

import pytest

from ztunnel_fast import _splice
from ztunnel_fast.engine.pure import PureEngine

from .test_native_engine import (  # noqa: F401 - certs: the fixture
    HTTPBIN,
    SLEEP,
    NativeEngine,
    Pair,
    certs,
    payload,
    read_to_eof,
    run,
    send_all_then_fin,
)

KEEPALIVE = (180, 180, 9)


def packed(ip: str) -> bytes:
    return ip_address(ip).packed


V4, V6 = packed("10.0.0.2"), packed("fd00::2")


def test_install_replace_and_flush():
    core = _splice.Core(2)
    try:
        core.inflow_install(7, b"10.0.0.2:80", 1, V4, 80, b"", 0, 10.0, KEEPALIVE)
        core.inflow_install(7, b"10.0.0.2:81", 2, V4, 81, b"", 0, 10.0, KEEPALIVE)
        core.inflow_install(8, b"10.0.0.2:80", 3, V4, 80, packed("10.0.0.1"), 1337, 10.0, KEEPALIVE)
        core.inflow_install(7, b"10.0.0.2:80", 4, V4, 80, b"", 0, 10.0, KEEPALIVE)  # replaces flow 1
        core.inflow_install(7, b"[fd00::2]:80", 5, V6, 80, packed("fd00::1"), 0, 10.0, KEEPALIVE)  # IPv6
        assert core.inflow_stats == (4, 0, 0, 0)
        core.inflow_flush(7)  # the entries of connection 7
        assert core.inflow_stats == (1, 0, 0, 0)
        core.inflow_flush()  # a state change: everything, and the generation moves
        assert core.inflow_stats == (0, 0, 0, 1)
        with pytest.raises(ValueError):
            core.inflow_install(7, b"1" * 65, 5, V4, 80, b"", 0, 10.0, KEEPALIVE)
        with pytest.raises(ValueError):  # the source of another family than the upstream's
            core.inflow_install(7, b"10.0.0.2:80", 6, V4, 80, packed("fd00::1"), 0, 10.0, KEEPALIVE)
        with pytest.raises(ValueError):  # an address is 4 or 16 bytes
            core.inflow_install(7, b"10.0.0.2:80", 6, b"\x0a\0\0", 80, b"", 0, 10.0, KEEPALIVE)
        assert core.inflow_stats[0] == 0
    finally:
        core.stop()


class Sink:
    """Stands in for proxy/fastpath_inbound.InboundFastPath: records the workers' events."""

    def __init__(self):
        self.opened = []
        self.ended = []
        self.socks = {}

    def on_open(self, conn_id, token, sid, fd, flow_id, start_ns, fields):
        self.socks[token] = socket.socket(fileno=fd)
        self.opened.append((conn_id, sid, flow_id, fields))

    def on_end(self, token, kind, code, err, sent, received):
        self.ended.append((kind, sent, received))
        self.socks.pop(token).close()


async def _echo_server(loop, lsock):
    conns = []

    async def one(sock):
        while data := await loop.sock_recv(sock, 1 << 16):
            await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)
        sock.close()

    while True:
        sock, _ = await loop.sock_accept(lsock)
        sock.setblocking(False)
        conns.append(asyncio.ensure_future(one(sock)))


def handed_back(pair, note=lambda stream: stream.id) -> list:
    """The CONNECTs the worker handed back to the event loop's path (this test's: Pair.serve, 503),
    noted with `note` in the list returned as they arrive."""
    served = []
    serve = pair.serve

    async def counting(stream):
        served.append(note(stream))
        await serve(stream)

    pair.server.on_request = counting
    return served


async def _tunnel(pair, loop, headers, data):
    """One CONNECT from the pure client: (status, echoed bytes)."""
    stream = pair.client.start_stream(headers)
    try:
        await pair.client.response(stream)
    except Exception as exc:  # noqa: BLE001 - the status is what the test looks at
        return getattr(exc, "status", None), b""
    down, plain = socket.socketpair()
    down.setblocking(False)
    plain.setblocking(False)
    task = asyncio.ensure_future(pair.client_engine.tunnel(plain, stream, "cli"))
    await send_all_then_fin(loop, down, data)
    got = await read_to_eof(loop, down)
    await task
    plain.close()
    down.close()
    return 200, got


@pytest.mark.parametrize("loopback", ["127.0.0.1", "::1"])
def test_a_worker_answers_cached_connects_and_hands_the_rest_over(certs, loopback):
    """Either family: the worker dials the app over IPv4 or IPv6 (the :authority "[::1]:port")."""
    family = socket.AF_INET6 if ":" in loopback else socket.AF_INET
    host = f"[{loopback}]" if family == socket.AF_INET6 else loopback

    async def main():
        loop = asyncio.get_running_loop()
        server_engine = NativeEngine(workers=2)
        sink = server_engine.inbound_sink = Sink()
        lsock = socket.create_server((loopback, 0), family=family)
        lsock.setblocking(False)
        port = lsock.getsockname()[1]
        with socket.create_server((loopback, 0), family=family) as closed:
            dead_port = closed.getsockname()[1]  # nothing listens there once closed
        app = asyncio.ensure_future(_echo_server(loop, lsock))
        pair = await Pair(certs, PureEngine(), server_engine, status=503).open()
        core = server_engine.core
        cid = pair.server.id
        authority, dead = f"{host}:{port}", f"{host}:{dead_port}"
        core.inflow_install(cid, authority.encode(), 11, packed(loopback), port, b"", 0, 5.0, KEEPALIVE)
        core.inflow_install(cid, dead.encode(), 12, packed(loopback), dead_port, b"", 0, 5.0, KEEPALIVE)
        served = handed_back(pair, lambda stream: dict(stream.request_headers).get(":authority"))
        data = payload(200_000, 3)
        base = [(":method", "CONNECT"), (":authority", authority)]
        # a hit: the worker dials, answers 200 and splices; the event loop only hears the events
        status, got = await _tunnel(pair, loop, base + [("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-00")], data)
        assert (status, got == data, served) == (200, True, [])
        for _ in range(100):
            if sink.ended:
                break
            await asyncio.sleep(0.02)
        assert [(o[2], dict(o[3])[b":authority"]) for o in sink.opened] == [(11, authority.encode())]
        assert sink.ended == [(0, len(data), len(data))]
        # a field the verdict did not cover: the event loop's path
        assert (await _tunnel(pair, loop, base + [("user-agent", "x")], data))[0] == 503
        # a refused dial is handed back untouched (the event loop dials and answers itself)
        assert (await _tunnel(pair, loop, [(":method", "CONNECT"), (":authority", dead)], data))[0] == 503
        assert served == [authority, dead]
        assert core.inflow_stats[1:3] == (1, 1)
        # a flush: nothing is answered from the old verdicts any more
        core.inflow_flush()
        assert (await _tunnel(pair, loop, base, data))[0] == 503
        assert served == [authority, dead, authority] and len(sink.opened) == 1
        pair.close()
        app.cancel()
        lsock.close()
        await asyncio.sleep(0.05)
        server_engine.close()

    run(main())


def test_a_dial_past_its_timeout_is_handed_over(certs):
    """The app's accept queue is full (SYNs dropped: the dial hangs): after the entry's connect
    timeout the worker lets go of the dial and the event loop's path gets the CONNECT."""
    async def main():
        loop = asyncio.get_running_loop()
        server_engine = NativeEngine(workers=1)
        sink = server_engine.inbound_sink = Sink()
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        queued = []
        for _ in range(4):  # fill the accept queue (nobody accepts); later SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            queued.append(s)
        await asyncio.sleep(0.2)
        pair = await Pair(certs, PureEngine(), server_engine, status=503).open()
        authority = f"127.0.0.1:{port}"
        server_engine.core.inflow_install(pair.server.id, authority.encode(), 21, packed("127.0.0.1"), port, b"", 0, 0.3,
                                          KEEPALIVE)
        served = handed_back(pair)
        status, _ = await _tunnel(pair, loop, [(":method", "CONNECT"), (":authority", authority)], b"x")
        assert status == 503 and len(served) == 1 and not sink.opened
        assert server_engine.core.inflow_stats[1:3] == (0, 1)  # the worker dialled, then handed it back
        pair.close()
        for s in queued:
            s.close()
        full.close()
        await asyncio.sleep(0.05)
        server_engine.close()

    run(main())


@pytest.mark.parametrize("app_ip,source", [("127.0.0.1", "127.0.0.2"), ("::1", "::1")])
def test_the_dial_spoofs_the_installed_source(certs, app_ip, source):
    """ORIG_SRC: the worker binds the dial to the entry's source (IP_TRANSPARENT, IPV6_TRANSPARENT
    for IPv6) and sets the entry's SO_MARK, as sockets.connect does (a failure of either would hand
    the CONNECT to the event loop: 503 here): the app sees the peer's address (here 127.0.0.2 on
    loopback; IPv6 loopback has one address, ::1, so there the bind is what is checked)."""
    family = socket.AF_INET6 if ":" in app_ip else socket.AF_INET

    async def main():
        loop = asyncio.get_running_loop()
        server_engine = NativeEngine(workers=1)
        sink = server_engine.inbound_sink = Sink()
        lsock = socket.create_server((app_ip, 0), family=family)
        lsock.setblocking(False)
        port = lsock.getsockname()[1]
        peers = []

        async def app():
            sock, addr = await loop.sock_accept(lsock)
            peers.append(addr[0])
            sock.setblocking(False)
            while data := await loop.sock_recv(sock, 1 << 16):
                await loop.sock_sendall(sock, data)
            sock.close()

        task = asyncio.ensure_future(app())
        pair = await Pair(certs, PureEngine(), server_engine, status=503).open()
        authority = f"[{app_ip}]:{port}" if family == socket.AF_INET6 else f"{app_ip}:{port}"
        server_engine.core.inflow_install(pair.server.id, authority.encode(), 31, packed(app_ip), port, packed(source),
                                          0x539, 5.0, KEEPALIVE)
        status, got = await _tunnel(pair, loop, [(":method", "CONNECT"), (":authority", authority)], b"hello")
        assert (status, got, peers) == (200, b"hello", [source])
        for _ in range(100):
            if sink.ended:
                break
            await asyncio.sleep(0.02)
        assert [o[2] for o in sink.opened] == [31] and len(sink.ended) == 1
        pair.close()
        task.cancel()
        lsock.close()
        await asyncio.sleep(0.05)
        server_engine.close()

    run(main())


@pytest.fixture
def pod_netns():
    """A fresh network namespace (loopback up) as an fd, like istio-cni hands over; removed after."""
    import os
    import subprocess
    import uuid

    name = f"podin-ut-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _in(netns_fd: int, fn):
    """fn() run on a thread of its own inside `netns_fd` (the sockets it makes belong there)."""
    import concurrent.futures
    import os

    from ztunnel_fast.inpod.netns import _setns

    def call():
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(netns_fd)
            try:
                return fn()
            finally:
                _setns(home)
        finally:
            os.close(home)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


def _listener_in(netns_fd: int, port: int) -> socket.socket:
    """A listener on 127.0.0.1:`port` created inside `netns_fd`."""
    return _in(netns_fd, lambda: socket.create_server(("127.0.0.1", port)))


def test_a_dial_in_flight_when_its_pod_is_flushed_opens_no_tunnel(certs, pod_netns):
    """The pod's removal flushes its verdicts while a worker's dial into the pod hangs (the app's
    accept queue is full): when the dial then succeeds, the worker hands the CONNECT back instead
    of answering from the forgotten verdict (the event loop's path answers: 503 here)."""
    async def main():
        loop = asyncio.get_running_loop()
        server_engine = NativeEngine(workers=1)
        sink = server_engine.inbound_sink = Sink()

        def full_listener():
            full = socket.socket()
            full.bind(("127.0.0.1", 0))
            full.listen(0)
            port = full.getsockname()[1]
            queued = []
            for _ in range(4):  # fill the accept queue (nobody accepts yet); later SYNs are dropped
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                queued.append(s)
            return full, port, queued

        full, port, queued = _in(pod_netns, full_listener)
        await asyncio.sleep(0.2)
        pair = await Pair(certs, PureEngine(), server_engine, status=503).open()
        served = handed_back(pair)
        core = server_engine.core
        authority = f"127.0.0.1:{port}"
        core.inflow_install(pair.server.id, authority.encode(), 51, packed("127.0.0.1"), port, b"", 0, 10.0, KEEPALIVE,
                            pod_netns, 5)
        tunnel = asyncio.ensure_future(_tunnel(pair, loop, [(":method", "CONNECT"), (":authority", authority)], b"x"))
        await asyncio.sleep(0.3)  # the worker is dialling (its SYN dropped)
        assert not tunnel.done() and not served
        core.inflow_flush_scope(5)  # the pod goes
        full.setblocking(False)
        for s in queued:  # room in the queue: the retransmitted SYN (within ~1 s) connects
            s.close()
        while True:
            try:
                full.accept()[0].close()
            except BlockingIOError:
                break
        status, _ = await asyncio.wait_for(tunnel, 10)
        assert status == 503 and len(served) == 1 and not sink.opened
        assert core.inflow_stats[1:3] == (0, 1) and core.inflow_netns_errors == 0
        # the worker's dial did connect (then let go): it was the flush, not a failed dial, that
        # handed it back (this test's event loop path never dials)
        dialled = await asyncio.wait_for(loop.sock_accept(full), 5)
        dialled[0].close()
        pair.close()
        full.close()
        await asyncio.sleep(0.05)
        server_engine.close()

    run(main())


def test_a_pods_verdict_dials_inside_the_pods_namespace(certs, pod_netns):
    """In-pod: the worker creates the upstream socket inside the entry's namespace fd (the app there
    answers, not the one on the same address in ours), a namespace it cannot enter hands the CONNECT
    back (the event loop's path answers), and once the pod's entries are flushed nothing uses its fd."""
    import gc
    import os

    async def main():
        loop = asyncio.get_running_loop()
        server_engine = NativeEngine(workers=2)
        sink = server_engine.inbound_sink = Sink()
        home = socket.create_server(("127.0.0.1", 0))
        port = home.getsockname()[1]
        pod = _listener_in(pod_netns, port)  # the same address, in the pod
        apps = []

        async def app(lsock, name):
            lsock.setblocking(False)
            while True:
                sock, _ = await loop.sock_accept(lsock)
                sock.setblocking(False)
                await loop.sock_sendall(sock, name)
                while await loop.sock_recv(sock, 1 << 16):
                    pass
                sock.close()

        apps = [asyncio.ensure_future(app(home, b"home")), asyncio.ensure_future(app(pod, b"pod"))]
        pair = await Pair(certs, PureEngine(), server_engine, status=503).open()
        served = handed_back(pair)
        core = server_engine.core
        authority = f"127.0.0.1:{port}"
        request = [(":method", "CONNECT"), (":authority", authority)]
        with pytest.raises(ValueError):  # a pod's verdict is always flushable by its pod
            core.inflow_install(pair.server.id, authority.encode(), 40, packed("127.0.0.1"), port, b"", 0, 5.0, KEEPALIVE,
                                pod_netns, 0)
        core.inflow_install(pair.server.id, authority.encode(), 41, packed("127.0.0.1"), port, b"", 0x539, 5.0, KEEPALIVE,
                            pod_netns, 3)
        for _ in range(3):  # each CONNECT's socket is made in the pod, from either worker
            assert await _tunnel(pair, loop, request, b"x") == (200, b"pod")
        assert served == [] and [o[2] for o in sink.opened] == [41] * 3
        assert core.inflow_netns_errors == 0
        # a namespace fd the worker cannot enter: handed back, the event loop's path answers
        core.inflow_install(pair.server.id, authority.encode(), 42, packed("127.0.0.1"), port, b"", 0, 5.0, KEEPALIVE,
                            not_a_netns, 4)
        assert (await _tunnel(pair, loop, request, b"x"))[0] == 503
        assert len(served) == 1 and len(sink.opened) == 3 and core.inflow_netns_errors == 1
        core.inflow_flush_scope(4)
        assert core.inflow_stats[0] == 0
        # the pod's entries go with its flush (a node verdict of another connection would stay)
        core.inflow_install(pair.server.id, authority.encode(), 43, packed("127.0.0.1"), port, b"", 0, 5.0, KEEPALIVE,
                            pod_netns, 3)
        gen = core.inflow_stats[3]
        core.inflow_flush_scope(3)
        assert core.inflow_stats[0] == 0 and core.inflow_stats[3] == gen + 1
        assert (await _tunnel(pair, loop, request, b"x"))[0] == 503 and len(served) == 2
        # the workers are home: a node verdict dials in our namespace
        core.inflow_install(pair.server.id, authority.encode(), 44, packed("127.0.0.1"), port, b"", 0, 5.0, KEEPALIVE)
        assert await _tunnel(pair, loop, request, b"x") == (200, b"home")
        for _ in range(100):
            if len(sink.ended) == 4:
                break
            await asyncio.sleep(0.02)
        assert len(sink.ended) == 4
        pair.close()
        for task in apps:
            task.cancel()
        home.close()
        pod.close()
        await asyncio.sleep(0.05)
        server_engine.close()

    def fds():
        gc.collect()  # the engine's Core closes its own namespace fd when it goes
        return sorted(os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{n}"))

    before = fds()
    not_a_netns = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        run(main())
    finally:
        os.close(not_a_netns)
    assert fds() == before  # the engine keeps no fd of the pod (nor its own home's)
