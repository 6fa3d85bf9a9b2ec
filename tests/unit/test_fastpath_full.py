"""The outbound fast path's control side (proxy/fastpath.py) when a key's HBONE connection is full:
a worker's hand-over that names the full connection makes the next decision dial another one for
the key (one dial at a time), the key's entries move onto it once it is up (each replaced in place)
and the full one is sent GOAWAY, keeping its streams; a flush during the dial leaves nothing old
to move; drain covers both the full connection and the one being dialled.

The engine's core is a stand-in that keeps the table's shape (class -> connection id, replace on
install, flush by connection or all) and records GOAWAYs: the decisions are the subject here, the
native table itself is tested in test_native_engine.py and the e2e tests."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from types import SimpleNamespace

import pytest

from ztunnel_fast.hbone.pool import PoolKey
from ztunnel_fast.proxy import fastpath
from ztunnel_fast.proxy.flowcache import FlowEntry, addr16

CLIENT = ipaddress.ip_address("10.0.0.1")
SERVER = ipaddress.ip_address("10.0.0.2")
OTHER = ipaddress.ip_address("10.0.0.3")
KEY = PoolKey.of("spiffe://cluster.local/ns/demo/sa/sleep", ["spiffe://cluster.local/ns/demo/sa/httpbin"],
                 (SERVER, 15008))


class FakeCore:
    flow_stats = (0, 0, 0, 0)

    def __init__(self):
        self.table: dict[tuple, int] = {}  # (listener, src, dst, port) -> connection id
        self.goaways: list[int] = []
        self.enabled: dict[int, int] = {}

    def listen(self, fd, keepalive, lid):
        pass

    def unlisten(self, lid):
        pass

    def flow_install(self, src, dst, port, conn_id, worker, flow_id, prefix, fwd_host, suffix, lid=1):
        self.table[(lid, src, dst, port)] = conn_id  # replaces the class's entry, as the native table does

    def flow_flush(self, conn_id=0):
        self.table = {k: c for k, c in self.table.items() if conn_id and c != conn_id}

    def flow_flush_listener(self, lid):
        self.table = {k: c for k, c in self.table.items() if k[0] != lid}

    def fast_enable(self, worker, conn_id, max_streams):
        self.enabled[conn_id] = max_streams

    def goaway(self, worker, conn_id, code):
        self.goaways.append(conn_id)


class FakeConn:
    def __init__(self, ident: int):
        self.id = ident
        self.worker = 0
        self.name = f"hbone-{ident}"
        self.lost = None
        self.goaway_sent = False
        self.goaway_received = False
        self.idle_since = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def close(self):
        self.lost = ConnectionError("closed")
        self.closed.set_result(None)


class FakeOutbound:
    def __init__(self):
        self.dials: list[asyncio.Future] = []

    async def connect_hbone(self, key):
        fut = asyncio.get_running_loop().create_future()
        self.dials.append(fut)
        return await fut

    async def handle(self, sock):
        sock.close()


@pytest.fixture(autouse=True)
def any_route_is_cached(monkeypatch):
    monkeypatch.setattr(fastpath, "flow_entry", lambda flow, route, source, key, dedicated:
                        FlowEntry(flow, key, route, source, b"prefix", b"", b""))


def run(scenario):
    async def main():
        core = FakeCore()
        engine = SimpleNamespace(core=core, _closed=False, _conns={}, fast_sink=None)
        ctx = SimpleNamespace(engine=engine, dedicated=True, track=lambda task: None,
                              config=SimpleNamespace(pool_max_streams_per_connection=100,
                                                     pool_unused_release_timeout=300.0))
        outbound = FakeOutbound()
        fp = fastpath.FastPath(ctx, outbound)
        lsock = socket.socket()
        try:
            assert fp.listen(lsock) == 1
            await scenario(fp, core, engine, outbound)
        finally:
            fp.drain()
            lsock.close()
            await asyncio.sleep(0)

    asyncio.run(main())


def learn(fp, dst=SERVER):
    fp.learn("route", None, KEY, CLIENT, dst, 80)


def cls(dst=SERVER) -> tuple:
    return (1, addr16(CLIENT), addr16(dst), 80)


async def settle():
    for _ in range(3):
        await asyncio.sleep(0)


async def dialled(outbound, conn, engine, index):
    await settle()
    engine._conns[conn.id] = conn
    outbound.dials[index].set_result(conn)
    await settle()


def hand_over(fp, full: int) -> None:
    """A worker hands a connection back, naming the connection it found full (0: another reason)."""
    a, _ = socket.socketpair()
    fp.on_accepted(a.detach(), 1, full)
    _.close()


async def first_connection_found_full(fp, outbound, engine):
    """The key's first connection (id 11) is up, a worker finds it full, and the class is decided
    again: the successor is being dialled.  Returns the full connection."""
    learn(fp)
    c1 = FakeConn(11)
    await dialled(outbound, c1, engine, 0)
    hand_over(fp, 11)
    learn(fp)
    return c1


def test_a_full_connection_gets_a_successor_and_the_keys_entries_move_onto_it():
    async def scenario(fp, core, engine, outbound):
        learn(fp)
        learn(fp, OTHER)  # decided while the first connection is dialled: one dial for the key
        await settle()
        assert len(outbound.dials) == 1
        c1 = FakeConn(11)
        await dialled(outbound, c1, engine, 0)
        assert core.table == {cls(): 11, cls(OTHER): 11} and core.enabled == {11: 100}
        learn(fp)  # installed on a usable connection: nothing to do
        hand_over(fp, 0)  # another reason (no entry, say): the connection is not marked
        learn(fp)
        await settle()
        assert len(outbound.dials) == 1 and not c1.fast_full
        hand_over(fp, 11)
        assert c1.fast_full
        learn(fp)  # OTHER is not decided again: it moves with the key
        learn(fp, ipaddress.ip_address("10.0.0.4"))  # a new class of the key waits for the new connection
        await settle()
        assert len(outbound.dials) == 2  # one dial in flight per key
        assert core.table == {cls(): 11, cls(OTHER): 11}  # the full one keeps them until its successor is up
        assert core.goaways == []
        c2 = FakeConn(12)
        await dialled(outbound, c2, engine, 1)
        assert core.table == {cls(): 12, cls(OTHER): 12, cls(ipaddress.ip_address("10.0.0.4")): 12}
        assert core.goaways == [11] and c1.goaway_sent and not c1.closed.done()  # keeps its streams
        assert fp.conns[(1, KEY)] is c2 and not c2.fast_full
        c1.close()  # its last stream ended: the worker closed it
        await asyncio.sleep(0)
        assert core.table == {cls(): 12, cls(OTHER): 12, cls(ipaddress.ip_address("10.0.0.4")): 12}
        assert len(fp.installed) == 3 and fp.conns[(1, KEY)] is c2

    run(scenario)


def test_a_flush_during_the_dial_leaves_nothing_old_to_move():
    async def scenario(fp, core, engine, outbound):
        await first_connection_found_full(fp, outbound, engine)
        await settle()
        assert len(outbound.dials) == 2
        fp.flush()  # a state change while the successor is dialled
        c2 = FakeConn(12)
        await dialled(outbound, c2, engine, 1)
        assert core.table == {} and fp.installed == {}
        assert core.goaways == [11] and fp.conns[(1, KEY)] is c2
        learn(fp)  # decided under the new state: rides the successor at once
        await settle()
        assert core.table == {cls(): 12} and len(outbound.dials) == 2

    run(scenario)


def test_drain_covers_the_full_connection_and_the_one_being_dialled():
    async def scenario(fp, core, engine, outbound):
        await first_connection_found_full(fp, outbound, engine)
        fp.drain()
        assert core.table == {} and core.goaways == [11]
        c2 = FakeConn(12)
        await dialled(outbound, c2, engine, 1)
        assert c2.closed.done() and fp.conns.get((1, KEY)) is not c2  # dialled for nothing: closed
        assert core.table == {} and 12 not in core.enabled

    run(scenario)
