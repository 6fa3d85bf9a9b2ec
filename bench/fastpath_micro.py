"""The event loop's Python per fast-path tunnel, in process: on_open, the poll's tracking
(after_batch) and on_end of FastPath (outbound) or InboundFastPath (--side inbound, with the
connection's own stream bookkeeping the engine does after it) driven with a batch's worth of
tunnels at a time, on a stand-in engine and context (no workers, no network), INFO off as the
bench runs.  What it
measures is the control side's per-tunnel work (record, metrics, tracking, lines' level checks,
the close of a descriptor); the syscalls of the real socket teardown and the wake-ups are not in
it.  Bounded by its count.

    .venv/bin/python -m bench.fastpath_micro [--side outbound|inbound] [--count 20000] [--batch 4]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import time
from types import SimpleNamespace

ID = b"0123456789abcdef0123456789abcdef"


class _Scope:
    """ProxyContext.track's shape: a set of futures drain would wait for."""

    dedicated = False

    def __init__(self):
        self.tunnels: set = set()

    def track(self, fut) -> None:
        self.tunnels.add(fut)
        fut.add_done_callback(self.tunnels.discard)


def us_per_tunnel(count: int = 20000, batch: int = 4, side: str = "outbound") -> float:
    """CPU µs (process time) per tunnel of on_open + tracking + on_end, best of three rounds."""
    import uvloop

    return uvloop.run(_run(count, batch) if side == "outbound" else _run_inbound(count, batch))


async def _timed(count: int, batch: int, open_one, end_one, after: list) -> float:
    """Best of three rounds: µs per tunnel of opening a batch, its poll's after_batch, then ending
    it (each followed by a loop iteration, as the next poll would be)."""
    best = float("inf")
    token = 0
    for _ in range(3):
        spent = 0.0
        for _start in range(0, count, batch):
            fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(batch)]  # not timed
            t0 = time.process_time()
            tokens = []
            for fd in fds:
                token += 1
                tokens.append(token)
                open_one(token, fd)
            while after:
                after.pop()()
            await asyncio.sleep(0)
            for tok in tokens:
                end_one(tok)
            while after:
                after.pop()()
            await asyncio.sleep(0)
            spent += time.process_time() - t0
        best = min(best, spent / (count - count % batch or count) * 1e6)
    return best


async def _run_inbound(count: int, batch: int) -> float:
    from ztunnel_fast.engine.native import END_CLEAN
    from ztunnel_fast.proxy.connections import ConnectionManager
    from ztunnel_fast.proxy.fastpath_inbound import InboundFastPath
    from ztunnel_fast.proxy.flowcache import InboundClass, InboundEntry
    from ztunnel_fast.state.workload import Workload
    from ztunnel_fast.telemetry.access import ConnectionRecord
    from ztunnel_fast.telemetry.metrics import Metrics, Peer

    loop = asyncio.get_running_loop()
    after: list = []
    engine = SimpleNamespace(core=None, _closed=False, _conns={}, after_batch=after.append, loop=loop)
    scope = _Scope()
    ctx = SimpleNamespace(engine=engine, metrics=Metrics(), track=scope.track, connections=ConnectionManager(),
                          state=object(), config=SimpleNamespace(network=""))
    fp = InboundFastPath(ctx)
    peer = (ipaddress.IPv4Address("10.0.0.1"), 15008)
    target = (ipaddress.IPv4Address("10.0.0.2"), 80)
    workload = Workload(uid="d", name="httpbin-1", namespace="demo")
    entry = InboundEntry(InboundClass(7, "10.0.0.2:80"), peer, None, target[0], target, workload, None, None)
    fp.entries[1] = entry
    record = ConnectionRecord(ctx.metrics, direction="inbound", src_addr=peer, dst_addr=target, hbone_addr=target,
                              source=Peer(), destination=Peer(workload), mtls=True)
    fp._records[1] = {"": (ctx.state, record)}
    conn = SimpleNamespace(id=7, worker=0, streams={}, streams_opened=0, lost=None, loop=loop)
    conn._on_stream_end = lambda sid, kind, code: conn.streams.pop(sid)._on_end(kind, code)
    engine._conns[7] = conn
    fields = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:80"),
              (b"traceparent", b"00-0123456789abcdef0123456789abcdef-0123456789abcdef-01")]

    def open_one(token, fd):
        fp.on_open(7, token, 2 * token + 1, fd, 1, time.monotonic_ns(), fields)

    def end_one(token):
        fp.on_end(token, END_CLEAN, 0, 0, 100, 200)
        conn._on_stream_end(2 * token + 1, END_CLEAN, 0)  # NativeEngine._dispatch: the connection's bookkeeping

    best = await _timed(count, batch, open_one, end_one, after)
    ctx.metrics.exposition(None)
    return best


async def _run(count: int, batch: int) -> float:
    from ztunnel_fast.engine.native import END_CLEAN
    from ztunnel_fast.proxy import fastpath
    from ztunnel_fast.proxy.flowcache import FlowClass, FlowEntry
    from ztunnel_fast.state.workload import Workload  # noqa: F401 - the real import cost is not measured
    from ztunnel_fast.telemetry.access import ConnectionRecord
    from ztunnel_fast.telemetry.metrics import Metrics, Peer

    after: list = []
    engine = SimpleNamespace(core=None, _closed=False, _conns={}, after_batch=after.append,
                             loop=asyncio.get_running_loop())
    scope = _Scope()
    ctx = SimpleNamespace(engine=engine, metrics=Metrics(), track=scope.track, dedicated=False,
                          config=SimpleNamespace(pool_max_streams_per_connection=100, pool_unused_release_timeout=30.0))
    fp = fastpath.FastPath(ctx, outbound=SimpleNamespace(handle=None))
    client_ip = ipaddress.IPv4Address("10.0.0.1")
    flow = FlowClass(client_ip, ipaddress.IPv4Address("10.0.0.2"), 80, 1)
    route = SimpleNamespace(authority="10.0.0.2:80", next_hop=(ipaddress.IPv4Address("10.0.0.2"), 15008),
                            via=SimpleNamespace(value="Direct"))
    fp.entries[1] = FlowEntry(flow, None, route, None, b"", b"", b"")
    fp.listeners[1] = SimpleNamespace(lid=1, scope=ctx, open_connections=None)
    fp._records[1] = ConnectionRecord(ctx.metrics, direction="outbound", src_addr=(client_ip, 1), dst_addr=route.next_hop,
                                      source=Peer(), destination=Peer(), mtls=True)
    conn = SimpleNamespace(id=7, worker=0, fast_streams=0, idle_since=0.0, lost=None)
    engine._conns[7] = conn
    data = ID + int(client_ip).to_bytes(4, "little")

    def open_one(token, fd):
        fp.on_open(7, token, 2 * token + 1, fd, 40000 + token % 20000, 1, time.monotonic_ns(), data)

    def end_one(token):
        fp.on_end(token, END_CLEAN, 0, 0, 100, 200)

    best = await _timed(count, batch, open_one, end_one, after)
    ctx.metrics.exposition(None)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench.fastpath_micro", description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=4, help="tunnels opened (then ended) per poll")
    ap.add_argument("--side", choices=["outbound", "inbound"], default="outbound")
    a = ap.parse_args(argv)
    print(f"{us_per_tunnel(a.count, a.batch, a.side):.2f} µs of the event loop's Python per {a.side} fast-path tunnel "
          f"(on_open + tracking + on_end, batches of {a.batch})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
