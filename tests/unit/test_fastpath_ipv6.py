"""IPv6 on the fast paths (dual-stack pods): the flow caches' decisions for IPv6 classes
(proxy/flowcache.py, pure), the engine's one keyspace for both families (`addr16`), and the
CONNECT a native worker sends for an accepted IPv4 and IPv6 connection, byte for byte the header
fields the event loop's path sends (hbone.headers.connect_request; IPv6 `forwarded` is
for="[addr]:port").  The worker's block is read where the peer decodes it: a pure-engine server
over a real TLS socket pair."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address

import hpack
import pytest

from ztunnel_fast.engine.pure import PureEngine
from ztunnel_fast.hbone import headers as hbone_headers
from ztunnel_fast.hbone.pool import PoolKey
from ztunnel_fast.proxy.flowcache import FlowClass, InboundClass, addr16, flow_entry, inbound_entry, literal
from ztunnel_fast.proxy.route import decide
from ztunnel_fast.state.rbac import ConnectionInfo, Decision
from ztunnel_fast.state.store import ProxyState, RoundRobin
from ztunnel_fast.xds.local import parse_local_config

from .test_native_engine import HTTPBIN, SLEEP, NativeEngine, Pair, certs, run  # noqa: F401 - certs: the fixture

# dual stack: each pod has an IPv4 and an IPv6 address (the IPv6 ones with two runs of zeros, so
# their text is RFC 5952's choice: "fd00::1:0:0:a", the first longest run compressed)
DUAL = """
workloads:
- {uid: sleep, name: sleep, namespace: demo, serviceAccount: sleep, workloadIps: [198.18.0.1, "fd00::1:0:0:a"],
   protocol: HBONE, node: n1}
- {uid: httpbin, name: httpbin, namespace: demo, serviceAccount: httpbin, workloadIps: [198.18.0.2, "fd00::1:0:0:b"],
   protocol: HBONE, node: n2, services: {demo/httpbin.demo.svc.cluster.local: {8000: 80}}}
services:
- {name: httpbin, namespace: demo, hostname: httpbin.demo.svc.cluster.local, vips: [/198.19.0.10, "/fd01::10"],
   ports: {8000: 80}}
"""


def _state():
    return ProxyState.from_local(parse_local_config(DUAL, "test"))


def _entry(state, src, dst, port, *, listener=1):
    source = state.workload_by_uid("sleep")
    route = decide(state, RoundRobin(), source=source, dst_ip=ip_address(dst), dst_port=port)
    flow = FlowClass(ip_address(src), ip_address(dst), port, listener)
    key = PoolKey.of(source.identity, route.identities, route.next_hop or (ip_address(dst), port))
    return route, flow_entry(flow, route, source, key, dedicated=False)


# -- the decisions (pure) -------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst,port,cached,why", [
    ("fd00::1:0:0:a", "fd00::1:0:0:b", 80, True, "HBONE straight to a mesh workload, over IPv6"),
    ("198.18.0.1", "198.18.0.2", 80, True, "the same over IPv4"),
    ("fd00::1:0:0:a", "fd01::10", 8000, False, "an IPv6 service VIP: round robin per connection"),
    ("fd00::1:0:0:a", "fd00::99", 80, False, "IPv6 passthrough"),
    ("198.18.0.1", "fd00::1:0:0:b", 80, False, "the class's ends of two families"),
])
def test_which_ipv6_flows_are_cached(src, dst, port, cached, why):
    _, entry = _entry(_state(), src, dst, port)
    assert (entry is not None) is cached, why


def test_an_ipv6_entry_connects_to_the_ipv6_authority():
    route, entry = _entry(_state(), "fd00::1:0:0:a", "fd00::1:0:0:b", 80)
    assert route.authority == "[fd00::1:0:0:b]:80"
    assert hpack.Decoder().decode(entry.prefix) == [(":method", "CONNECT"), (":authority", "[fd00::1:0:0:b]:80")]


def test_the_ipv6_entrys_block_with_the_per_connection_fields_is_the_event_loops_connect():
    """As a worker fills it in (_splice_flow.pxi: format_addr_port): for="[addr]:port"."""
    state = _state()
    route, entry = _entry(state, "fd00::1:0:0:a", "fd00::1:0:0:b", 80)
    trace = "0123456789abcdef0123456789abcdef"
    block = (entry.prefix + literal("forwarded", 'for="[fd00::1:0:0:a]:40000"' + entry.fwd_host.decode())
             + literal("traceparent", f"00-{trace}-0011223344556677-00") + entry.suffix)
    expected = hbone_headers.connect_request(route.authority, client_ip=ip_address("fd00::1:0:0:a"),
                                             client_port=40000, trace_id=trace, source=state.workload_by_uid("sleep"))
    decoded = hpack.Decoder().decode(block)
    assert [n for n, _ in decoded] == [n for n, _ in expected]
    assert [v for n, v in decoded if n != "traceparent"] == [v for n, v in expected if n != "traceparent"]
    assert dict(expected)["forwarded"] == 'for="[fd00::1:0:0:a]:40000"'


def test_one_keyspace_for_both_families():
    """IPv4 as IPv4-mapped IPv6, IPv6 as it is: 16 bytes each, no two addresses alike."""
    v4, v6 = ip_address("198.18.0.1"), ip_address("fd00::1:0:0:a")
    assert addr16(v4) == ip_address("::ffff:198.18.0.1").packed
    assert addr16(v6) == v6.packed and len({addr16(v4), addr16(v6)}) == 2
    assert FlowClass(v4, ip_address("198.18.0.2"), 80) != FlowClass(v6, ip_address("fd00::1:0:0:b"), 80)


def _inbound(target, peer, source):
    flow = InboundClass(7, hbone_headers.format_addr(*target))
    workload = _state().workload_by_uid("httpbin")
    info = ConnectionInfo(src_ip=peer, dst_ip=target[0], dst_port=target[1], src_identity=SLEEP)
    return inbound_entry(flow, peer=(peer, 40000), peer_id=SLEEP, arrived_on=target[0], target=target,
                         workload=workload, info=info, decision=Decision(True, "allowed", None), source=source,
                         netns=None)


def test_inbound_ipv6_verdicts_are_cached_with_a_source_of_their_family():
    v6, peer6, peer4 = ip_address("fd00::1:0:0:b"), ip_address("fd00::1:0:0:a"), ip_address("198.18.0.1")
    entry = _inbound((v6, 80), peer6, None)
    assert entry is not None and entry.flow.authority == "[fd00::1:0:0:b]:80"
    assert _inbound((v6, 80), peer6, peer6) is not None  # ORIG_SRC: the peer's IPv6 address
    assert _inbound((v6, 80), peer6, peer4) is None  # a source of the other family: the event loop's path
    assert _inbound((v6, 80), peer4, None) is None  # a peer of the other family: the event loop's path
    assert _inbound((ip_address("198.18.0.2"), 80), peer4, peer4) is not None


# -- the worker's CONNECT, as the peer decodes it ------------------------------------------------
class Sink:
    """Stands in for proxy/fastpath.FastPath: owns the sockets the workers hand over."""

    def __init__(self):
        self.opened, self.ended, self.accepted, self.socks = [], [], [], {}

    def on_open(self, conn_id, token, sid, fd, client_port, flow_id, accepted_ns, data):
        self.socks[token] = socket.socket(fileno=fd)
        self.opened.append((flow_id, client_port, data))

    def on_status(self, token, status):
        pass

    def on_end(self, token, kind, code, err, sent, received):
        self.ended.append(token)
        sock = self.socks.pop(token, None)
        if sock is not None:
            sock.close()

    def on_accepted(self, fd, lid=1, full=0):
        self.accepted.append(lid)
        socket.socket(fileno=fd).close()


def test_a_worker_sends_the_event_loops_connect_for_ipv4_and_ipv6_clients_of_one_listener(certs):
    """One listener id with an IPv4 and an IPv6 socket (dual stack): a connection to each is a hit
    whose CONNECT carries exactly connect_request's fields (forwarded for="[::1]:port" for IPv6);
    before, an IPv6 class sharing an IPv4 client's last 4 address bytes is a miss for it."""
    async def main():
        client_engine = NativeEngine(workers=2)
        sink = client_engine.fast_sink = Sink()
        pair = Pair(certs, client_engine, PureEngine(), status=503)
        seen = []

        async def record(stream):
            seen.append(list(stream.request_headers))
            stream.respond(503, end=True)

        pair.serve = record
        await pair.open()
        core = client_engine.core
        core.fast_enable(pair.client.worker, pair.client.id, 100)
        l4 = socket.create_server(("127.0.0.1", 0))
        l6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
        clients = []
        try:
            for lsock in (l4, l6):
                lsock.setblocking(False)
                core.listen(lsock.fileno(), (180, 180, 9), 3)
            # an IPv6 class whose last 4 bytes are 127.0.0.1 (::127.0.0.1): an IPv4 client is not of it
            compat = addr16(ip_address("::127.0.0.1"))
            core.flow_install(compat, compat, l4.getsockname()[1], pair.client.id, pair.client.worker, 9, b"x", b"",
                              b"", 3)
            miss = socket.socket()
            clients.append(miss)
            miss.connect(l4.getsockname())
            for _ in range(250):
                if sink.accepted:
                    break
                await asyncio.sleep(0.02)
            assert sink.accepted == [3] and not sink.opened and core.flow_stats[1:3] == (0, 1)
            clients.remove(miss)
            miss.close()
            for flow_id, lsock in ((1, l4), (2, l6)):
                ip, port = lsock.getsockname()[:2]
                dst = ip_address(ip)
                authority = hbone_headers.format_addr(dst, port)
                fields = hbone_headers.connect_request(authority, client_ip=dst, client_port=0, trace_id="0" * 32,
                                                       source=None)
                prefix = b"".join(literal(n, v) for n, v in fields[:2])
                core.flow_install(addr16(dst), addr16(dst), port, pair.client.id, pair.client.worker, flow_id,
                                  prefix, b"", b"", 3)
            for lsock in (l4, l6):
                c = socket.socket(lsock.family)
                c.connect(lsock.getsockname()[:2])
                clients.append(c)
                for _ in range(250):
                    if len(seen) == len(clients) and len(sink.ended) == len(clients):
                        break
                    await asyncio.sleep(0.02)
            assert len(seen) == 2 and [o[0] for o in sink.opened] == [1, 2], (seen, sink.opened)
            for c, headers, opened in zip(clients, seen, sink.opened):
                ip, port = c.getsockname()[:2]
                client_ip = ip_address(ip)
                assert opened[1] == port
                trace = opened[2][:32].decode()
                peer_ip, peer_port = c.getpeername()[:2]
                expected = hbone_headers.connect_request(hbone_headers.format_addr(ip_address(peer_ip), peer_port),
                                                         client_ip=client_ip, client_port=port, trace_id=trace,
                                                         source=None)
                assert [n for n, _ in headers] == [n for n, _ in expected]
                assert [v for n, v in headers if n != "traceparent"] == [v for n, v in expected if n != "traceparent"]
                assert hbone_headers.trace_id_of(dict(headers)["traceparent"]) == trace
            assert dict(seen[1])["forwarded"] == f'for="[::1]:{clients[1].getsockname()[1]}"'
            assert core.flow_stats[1:3] == (2, 1) and sink.accepted == [3]
        finally:
            core.unlisten(3)
            for s in clients + [l4, l6]:
                s.close()
            pair.close()
            await asyncio.sleep(0.05)
            client_engine.close()

    run(main())


# -- the control side: a scope's two listeners (proxy/fastpath.py) --------------------------------
class ListenCore:
    """Stands in for the engine's core: records which socket is listened on under which id."""

    flow_stats = (0, 0, 0, 0)

    def __init__(self):
        self.listened: list[tuple[int, int]] = []
        self.unlistened: list[int] = []

    def listen(self, fd, keepalive, lid):
        self.listened.append((fd, lid))

    def unlisten(self, lid):
        self.unlistened.append(lid)

    def flow_flush(self, conn_id=0):
        pass

    def flow_flush_listener(self, lid):
        pass


def test_a_scopes_ipv4_and_ipv6_listeners_share_its_listener_id():
    """Node mode's two outbound sockets are listener 1, a pod's two its own id: the flow class's
    addresses carry the family.  Unlistening the pod shuts both of its sockets down (the kernel
    refuses connections at once) and leaves node mode's listening."""
    from types import SimpleNamespace

    from ztunnel_fast.proxy import fastpath

    async def main():
        core = ListenCore()
        engine = SimpleNamespace(core=core, _closed=False, _conns={}, fast_sink=None)
        config = SimpleNamespace(pool_max_streams_per_connection=100, pool_unused_release_timeout=300.0,
                                 fast_path_handover_rate=200, fast_path_batch_window=0.005)
        ctx = SimpleNamespace(engine=engine, dedicated=True, track=lambda task: None, config=config)
        fp = fastpath.FastPath(ctx, SimpleNamespace(handle=None))
        pod = SimpleNamespace(dedicated=True, track=lambda task: None)
        socks = [socket.create_server(("127.0.0.1", 0)), socket.create_server(("::1", 0), family=socket.AF_INET6),
                 socket.create_server(("127.0.0.1", 0)), socket.create_server(("::1", 0), family=socket.AF_INET6)]
        try:
            assert [fp.listen(socks[0]), fp.listen(socks[1])] == [1, 1]
            assert [fp.listen(s, handle=None, scope=pod) for s in socks[2:]] == [2, 2]
            assert core.listened == [(s.fileno(), lid) for s, lid in zip(socks, (1, 1, 2, 2))]
            fp.unlisten(2)
            assert core.unlistened == [2] and list(fp.listeners) == [1]
            for s in socks[2:]:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(s.getsockname()[:2], timeout=5).close()
            for s in socks[:2]:
                socket.create_connection(s.getsockname()[:2], timeout=5).close()
            fp.drain()
            assert core.unlistened == [2, 1]
        finally:
            for s in socks:
                s.close()

    asyncio.run(main())
