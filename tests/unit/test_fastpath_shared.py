"""The outbound fast path's control side (proxy/fastpath.py) over the pool's connections: the first
entry on a pooled connection shares it with the workers (once), a class is learned on the
connection that answered its CONNECT and moves when the event loop's path got another one (a
worker found the first full), nothing decided before a flush is installed, no entry goes onto a
connection that is going, and a closed connection takes its entries with it.

The engine's core is a stand-in that keeps the table's shape (class -> connection id, replace on
install, flush by connection or all) and records what is enabled: the decisions are the subject
here, the native table itself is tested in test_native_engine.py and the e2e tests."""

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
        self.worker_table: dict[tuple, dict[int, int]] = {}  # (listener, ...) -> worker -> connection id
        self.flow_handover_rate = 0
        self.enabled: dict[int, int] = {}

    def listen(self, fd, keepalive, lid):
        pass

    def unlisten(self, lid):
        pass

    def flow_install(self, src, dst, port, conn_id, worker, flow_id, prefix, fwd_host, suffix, lid=1,
                     worker_conns=()):
        self.table[(lid, src, dst, port)] = conn_id  # replaces the class's entry, as the native table does
        self.worker_table[(lid, src, dst, port)] = {worker: conn_id, **dict(worker_conns)}

    def flow_flush(self, conn_id=0):
        """As the native table: a connection leaves every entry; one left with none goes."""
        if not conn_id:
            self.table, self.worker_table = {}, {}
            return
        for k, owned in list(self.worker_table.items()):
            owned = {w: c for w, c in owned.items() if c != conn_id}
            if owned:
                self.worker_table[k] = owned
                if self.table[k] == conn_id:
                    self.table[k] = owned[min(owned)]
            else:
                del self.worker_table[k], self.table[k]

    def flow_flush_listener(self, lid):
        self.table = {k: c for k, c in self.table.items() if k[0] != lid}
        self.worker_table = {k: c for k, c in self.worker_table.items() if k[0] != lid}

    def fast_enable(self, worker, conn_id, max_streams):
        self.enabled[conn_id] = max_streams


class FakeConn:
    def __init__(self, ident: int, engine, worker: int = 0):
        self.id = ident
        self.engine = engine
        self.worker = worker
        self.name = f"hbone-{ident}"
        self.lost = None
        self.goaway_sent = False
        self.goaway_received = False
        self.fast_enabled = False
        self.fast_full = False
        self.fast_streams = 0
        self.idle_since = 0.0
        self.closed = asyncio.get_running_loop().create_future()
        engine._conns[ident] = self

    def close(self):
        self.lost = ConnectionError("closed")
        self.closed.set_result(None)


class FakeOutbound:
    async def handle(self, sock):
        sock.close()


class FakePool:
    """The scope's pool as the fast path uses it: `add` dials one more connection for a key, owned
    by the worker named (the next id), or fails with `error`."""

    def __init__(self, engine):
        self.engine = engine
        self.added: list[tuple[PoolKey, int]] = []
        self.error: Exception | None = None
        self.next_id = 21
        self.gate: asyncio.Event | None = None  # set: the dial waits for it

    async def add(self, key, worker=None):
        self.added.append((key, worker))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        conn = FakeConn(self.next_id, self.engine, worker)
        self.next_id += 1
        return conn


@pytest.fixture(autouse=True)
def any_route_is_cached(monkeypatch):
    monkeypatch.setattr(fastpath, "flow_entry", lambda flow, route, source, key, dedicated:
                        FlowEntry(flow, key, route, source, b"prefix", b"", b""))


def run(scenario):
    async def main():
        core = FakeCore()
        engine = SimpleNamespace(core=core, _closed=False, _conns={}, fast_sink=None)
        ctx = SimpleNamespace(engine=engine, dedicated=True, track=lambda task: None, pool=FakePool(engine),
                              config=SimpleNamespace(pool_max_streams_per_connection=100, fast_path_handover_rate=200, fast_path_batch_window=0.005,
                                                     pool_unused_release_timeout=300.0))
        fp = fastpath.FastPath(ctx, FakeOutbound())
        lsock = socket.socket()
        try:
            assert fp.listen(lsock) == 1
            await scenario(fp, core, engine)
        finally:
            fp.drain()
            lsock.close()
            await asyncio.sleep(0)

    asyncio.run(main())


def learn(fp, conn, dst=SERVER, generation=None):
    """Outbound.handle's hook: the class's CONNECT was answered on `conn`."""
    fp.learn("route", None, KEY, conn, CLIENT, dst, 80, fp.generation if generation is None else generation)


def cls(dst=SERVER) -> tuple:
    return (1, addr16(CLIENT), addr16(dst), 80)


def hand_over(fp, full: int) -> None:
    """A worker hands a connection back, naming the connection it found full (0: another reason)."""
    a, _ = socket.socketpair()
    fp.on_accepted(a.detach(), 1, full)
    _.close()


def test_the_first_entry_shares_a_pooled_connection_once():
    async def scenario(fp, core, engine):
        c1 = FakeConn(11, engine)
        learn(fp, c1)
        assert c1.fast_enabled and core.enabled == {11: 100} and core.table == {cls(): 11}
        learn(fp, c1, OTHER)
        learn(fp, c1)  # installed on this connection already: nothing to do
        assert core.enabled == {11: 100} and core.table == {cls(): 11, cls(OTHER): 11}
        assert len(fp.installed) == 2 and fp.shared == {11: c1}

    run(scenario)


def test_a_class_moves_to_the_connection_the_event_loop_got_when_the_first_was_full():
    async def scenario(fp, core, engine):
        c1 = FakeConn(11, engine)
        learn(fp, c1)
        learn(fp, c1, OTHER)
        hand_over(fp, 0)  # another reason (no entry, say): the connection is not marked
        assert not c1.fast_full
        hand_over(fp, 11)  # a worker found it full: the pool skips it until a stream ends
        assert c1.fast_full
        c2 = FakeConn(12, engine)  # the pool dialled another for the key
        learn(fp, c2)
        assert core.table == {cls(): 12, cls(OTHER): 11}  # replaced in place; OTHER moves on its own miss
        assert core.enabled == {11: 100, 12: 100}
        learn(fp, c2, OTHER)
        assert core.table == {cls(): 12, cls(OTHER): 12}
        c1.close()  # its last stream ended after a GOAWAY: the worker closed it
        await asyncio.sleep(0)
        assert core.table == {cls(): 12, cls(OTHER): 12} and set(fp.shared) == {12}

    run(scenario)


def test_nothing_decided_before_a_flush_is_installed():
    async def scenario(fp, core, engine):
        c1 = FakeConn(11, engine)
        before = fp.generation
        fp.flush()  # a state change while the CONNECT was being answered
        learn(fp, c1, generation=before)
        assert core.table == {} and fp.installed == {} and not c1.fast_enabled
        learn(fp, c1)  # decided under the new state
        assert core.table == {cls(): 11}

    run(scenario)


def test_no_entry_goes_onto_a_connection_that_is_going():
    async def scenario(fp, core, engine):
        going = FakeConn(11, engine)
        going.goaway_received = True
        learn(fp, going)
        lost = FakeConn(12, engine)
        lost.lost = ConnectionError("reset")
        learn(fp, lost)
        assert core.table == {} and core.enabled == {}
        c3 = FakeConn(13, engine)
        learn(fp, c3)
        c3.goaway_sent = True  # e.g. the pool's idle release, after the entry went in
        learn(fp, c3, OTHER)
        assert core.table == {cls(): 13}

    run(scenario)


def test_a_closed_connection_takes_its_entries_and_drain_takes_the_rest():
    async def scenario(fp, core, engine):
        c1, c2 = FakeConn(11, engine), FakeConn(12, engine)
        learn(fp, c1)
        learn(fp, c2, OTHER)
        c1.close()
        await asyncio.sleep(0)
        assert core.table == {cls(OTHER): 12} and list(fp.installed) == [fastpath.FlowClass(CLIENT, OTHER, 80, 1)]
        fp.drain()
        assert core.table == {} and fp.installed == {}

    run(scenario)


# -- worker connections: a worker that hands a class over often gets a connection of its own --------
async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def flow_id_of(fp, dst=SERVER) -> int:
    return fp.installed[fastpath.FlowClass(CLIENT, dst, 80, 1)]


def test_a_hot_worker_gets_a_connection_of_its_own_for_every_class_of_the_key():
    async def scenario(fp, core, engine):
        pool = fp.ctx.pool
        c1 = FakeConn(11, engine, worker=0)
        learn(fp, c1)
        learn(fp, c1, OTHER)
        assert core.flow_handover_rate == 200  # ZTUNNEL_FAST_PATH_HANDOVER_RATE reaches the table
        assert core.worker_table == {cls(): {0: 11}, cls(OTHER): {0: 11}}
        hot = flow_id_of(fp)
        fp.on_hot(hot, 1)  # worker 1 hands the class over to worker 0 at the rate
        fp.on_hot(hot, 1)  # said again while the dial runs: one dial
        await settle()
        assert pool.added == [(KEY, 1)]
        # both classes of the key name worker 1's connection now (installed again: new flow ids)
        assert core.worker_table == {cls(): {0: 11, 1: 21}, cls(OTHER): {0: 11, 1: 21}}
        assert core.table == {cls(): 11, cls(OTHER): 11} and core.enabled == {11: 100, 21: 100}
        assert flow_id_of(fp) != hot and set(fp.shared) == {11, 21}
        fp.on_hot(hot, 1)  # an event of the replaced entry: nothing to do
        fp.on_hot(flow_id_of(fp), 1)  # worker 1 has its connection: nothing to dial
        await settle()
        assert pool.added == [(KEY, 1)]
        c3 = FakeConn(13, engine, worker=0)  # the event loop's path rode another connection of worker 0
        learn(fp, c3)
        assert core.worker_table[cls()] == {0: 13, 1: 21}  # worker 1's own connection stays
        engine._conns[21].close()  # worker 1's connection went: its classes stay on the rest
        await settle()
        assert core.worker_table == {cls(): {0: 13}, cls(OTHER): {0: 11}}
        assert len(fp.installed) == 2
        fp.on_hot(flow_id_of(fp), 1)  # hot again later: dialled again
        await settle()
        assert pool.added == [(KEY, 1), (KEY, 1)] and core.worker_table[cls()] == {0: 13, 1: 22}

    run(scenario)


def test_when_the_primary_goes_a_class_stays_on_its_worker_connection():
    async def scenario(fp, core, engine):
        c1 = FakeConn(11, engine, worker=0)
        learn(fp, c1)
        fp.on_hot(flow_id_of(fp), 1)
        await settle()
        c1.close()
        await settle()
        assert core.table == {cls(): 21} and core.worker_table == {cls(): {1: 21}}
        assert len(fp.installed) == 1 and [c.id for c in fp.flow_conns[flow_id_of(fp)]] == [21]
        engine._conns[21].close()
        await settle()
        assert core.table == {} and fp.installed == {}

    run(scenario)


def test_a_failed_or_outdated_dial_changes_nothing():
    async def scenario(fp, core, engine):
        pool = fp.ctx.pool
        c1 = FakeConn(11, engine, worker=0)
        learn(fp, c1)
        pool.error = ConnectionRefusedError(111, "Connection refused")
        fp.on_hot(flow_id_of(fp), 1)
        await settle()
        assert core.worker_table == {cls(): {0: 11}} and not fp._dialing
        pool.error = None
        pool.gate = asyncio.Event()
        fp.on_hot(flow_id_of(fp), 1)
        await settle()
        fp.flush()  # a state change while it was dialled: the classes are gone, the connection is pooled only
        pool.gate.set()
        await settle()
        assert len(pool.added) == 2 and core.table == {} and fp.installed == {}
        assert fp.worker_conns[(1, KEY)][1].id == 21  # the next class of the key learned gets it at once
        learn(fp, c1)
        assert core.worker_table == {cls(): {0: 11, 1: 21}}

    run(scenario)


def test_a_full_worker_connection_leaves_the_class_until_it_has_room_again():
    """Worker 1's own connection is full (held tunnels): its hand-over names it; the event loop's
    path rides another connection and the class is installed again without the full one, so worker
    1 hands over instead of being turned away; hot again once it has room, it is named again, with
    no dial."""
    async def scenario(fp, core, engine):
        pool = fp.ctx.pool
        c1 = FakeConn(11, engine, worker=0)
        learn(fp, c1)
        fp.on_hot(flow_id_of(fp), 1)
        await settle()
        assert core.worker_table == {cls(): {0: 11, 1: 21}}
        own = engine._conns[21]
        hand_over(fp, 21)  # worker 1 found its own connection full
        assert own.fast_full
        learn(fp, c1)  # the pool gave the event loop's path worker 0's connection
        assert core.worker_table == {cls(): {0: 11}}
        learn(fp, c1)  # nothing full in the entry now: nothing to do
        own.fast_full = False  # a stream on it ended
        fp.on_hot(flow_id_of(fp), 1)
        await settle()
        assert core.worker_table == {cls(): {0: 11, 1: 21}} and pool.added == [(KEY, 1)]

    run(scenario)
