"""The flow table's worker connections, on real native workers and real TLS connections: a class
installed with a connection per worker is opened, by whichever worker accepts it, on that worker's
own connection (no hand-over); a class with one connection is handed over by the other worker,
which says so once per entry (EV_FLOW_HOT) when ZTUNNEL_FAST_PATH_HANDOVER_RATE is reached; a
connection that goes leaves the class on the others.

Which worker accepts a connection is the kernel's choice (EPOLLEXCLUSIVE wakes one idle waiter), so
every assertion is exact for the workers that did accept, and the hand-over case is repeated with
the class's connection on each worker in turn until some worker handed over."""

from __future__ import annotations

import asyncio
import socket
from ipaddress import ip_address

from ztunnel_fast.engine.pure import PureEngine
from ztunnel_fast.hbone import headers as hbone_headers
from ztunnel_fast.proxy.flowcache import addr16, literal

from .test_fastpath_ipv6 import Sink as BaseSink
from .test_native_engine import NativeEngine, Pair, certs, run  # noqa: F401 - certs: the fixture

LID = 3


def accepting_worker(token: int) -> int:
    """A fast-path token says which worker accepted (bits 48-61, _splice_flow.pxi flow_lookup)."""
    return (token >> 48) & 0x3FFF


class Sink(BaseSink):
    """test_fastpath_ipv6's stand-in for FastPath (owns the sockets the workers hand over), which
    records each open as (connection id, accepting worker, flow id) and the EV_FLOW_HOT events."""

    def __init__(self):
        super().__init__()
        self.hot: list[tuple[int, int]] = []  # (flow id, worker)

    def on_open(self, conn_id, token, sid, fd, client_port, flow_id, accepted_ns, data):
        self.socks[token] = socket.socket(fileno=fd)
        self.opened.append((conn_id, accepting_worker(token), flow_id))

    def on_hot(self, flow_id, worker):
        self.hot.append((flow_id, worker))


def fast_listener(core, lsock: socket.socket, lid: int) -> tuple[str, int, bytes, bytes]:
    """The workers accept on `lsock` as listener `lid`: (its ip, port, 16-byte address, and the
    cached prefix of a CONNECT to it) for flow_install."""
    lsock.setblocking(False)
    core.listen(lsock.fileno(), (180, 180, 9), lid)
    ip, port = lsock.getsockname()
    fields = hbone_headers.connect_request(f"{ip}:{port}", client_ip=ip_address(ip), client_port=0,
                                           trace_id="0" * 32, source=None)
    return ip, port, addr16(ip_address(ip)), b"".join(literal(n, v) for n, v in fields[:2])


async def connect(sink: Sink, address, count: int) -> list[tuple[int, int, int]]:
    """`count` connections one after another to the fast-path listener; the opens they caused."""
    first = len(sink.opened)
    for _ in range(count):
        with socket.create_connection(address, timeout=5):
            pass
    for _ in range(500):
        if len(sink.opened) - first == count and len(sink.ended) == len(sink.opened):
            break
        await asyncio.sleep(0.01)
    return sink.opened[first:]


def test_each_worker_opens_a_class_on_its_own_connection_and_a_handing_worker_says_it_once(certs):
    async def main():
        engine = NativeEngine(workers=2)
        sink = engine.fast_sink = Sink()
        a = await Pair(certs, engine, PureEngine(), status=503).open()
        b = await Pair(certs, engine, PureEngine(), status=503).open()
        core = engine.core
        lsock = socket.create_server(("127.0.0.1", 0))
        try:
            conns = {a.client.id: a.client, b.client.id: b.client}
            assert {c.worker for c in conns.values()} == {0, 1}
            for conn in conns.values():
                conn.fast_enabled = True
                core.fast_enable(conn.worker, conn.id, 100)
            ip, port, here, prefix = fast_listener(core, lsock, LID)
            core.flow_handover_rate = 1  # the first hand-over of a worker makes the class hot for it

            # both workers own a connection of the class: no hand-over, so nothing is hot
            core.flow_install(here, here, port, a.client.id, a.client.worker, 1, prefix, b"", b"", LID,
                              ((b.client.worker, b.client.id),))
            opened = await connect(sink, (ip, port), 30)
            assert len(opened) == 30 and not sink.accepted
            assert all(conns[conn_id].worker == worker for conn_id, worker, _ in opened), opened
            assert sink.hot == []

            # one connection: the other worker hands over, and says so once for the entry
            flow_id, handed = 1, set()
            for turn in range(6):
                owner = (a, b)[turn % 2].client
                flow_id += 1
                core.flow_install(here, here, port, owner.id, owner.worker, flow_id, prefix, b"", b"", LID)
                before = len(sink.hot)
                opened = await connect(sink, (ip, port), 20)
                assert len(opened) == 20 and all(conn_id == owner.id for conn_id, _, _ in opened), opened
                handing = sorted({w for _, w, _ in opened if w != owner.worker})
                assert sink.hot[before:] == [(flow_id, w) for w in handing]  # once per worker, however many
                handed.update(handing)
                if handed:
                    break
            assert handed, "no worker ever handed over (each turn's accepts were all on the owner)"

            # a worker connection that goes leaves the class on the other one; the last takes it
            core.flow_install(here, here, port, a.client.id, a.client.worker, 99, prefix, b"", b"", LID,
                              ((b.client.worker, b.client.id),))
            core.flow_flush(a.client.id)
            assert core.flow_stats[0] == 1
            opened = await connect(sink, (ip, port), 10)
            assert len(opened) == 10 and {conn_id for conn_id, _, _ in opened} == {b.client.id}
            core.flow_flush(b.client.id)
            assert core.flow_stats[0] == 0
        finally:
            core.unlisten(LID)
            lsock.close()
            a.close()
            b.close()
            await asyncio.sleep(0.05)
            engine.close()

    run(main())
