"""The inbound fast path's control side (ZTUNNEL_FAST_PATH, native engine only): the native workers
answer the peer's CONNECTs of classes the event loop has decided once (an allow verdict: dial the
app, 200, splice); this module installs those decisions and turns the workers' batched events into
the same logs, access log lines and metrics (reporter=destination) as proxy/inbound.py.

Flow: a CONNECT arrives on an inbound HBONE connection -> its worker decodes the block and looks
(connection, :authority) up in the engine's inbound table -> hit: dials the app, answers 200 on
success, splices, and reports EV_INBOUND_OPEN then the completion; miss, failed dial or anything
unusual: the event loop gets the CONNECT (EV_HEADERS) and Inbound._stream, the reference path,
serves it and calls `learn`, which installs an entry when proxy/flowcache.py says it may.

Invariants:
- `flush` runs at the top of every state change (ProxyContext.replace_state) before the new state
  is in place: the engine's table is emptied and its generation moved under its lock, then the
  event queue is drained, so every tunnel the workers opened on an old verdict is tracked here
  before the new policies re-check the live connections (ConnectionManager.reevaluate closes
  those now denied), and no dial looked up before the flush opens a tunnel after it.
- Entries are forgotten with the flush or their connection (`forget`, after its EV_CLOSED, when no
  EV_INBOUND_OPEN of it can still be queued); a tunnel keeps its own reference to its entry.
- Every fast-path tunnel is tracked for drain (ctx.track) and for policy changes
  (ctx.connections) like Inbound._stream's task, once the poll that opened it is dispatched
  (NativeEngine.after_batch: no await and no state change can come in between); a tunnel whose
  completion came in that same poll is never tracked.  A tunnel cancelled by either is reset by
  its worker.
- Per-connection cost: the ConnectionRecord of a class (flow id, `forwarded`, state) is built once
  and copied per tunnel (ConnectionRecord.again); logs, access log lines and metrics are the same.
- The upstream socket the workers hand over is owned here from its event on and closed exactly once.
- Imported only with the native engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from h2.errors import ErrorCodes

from ..engine.native import NativeStream
from ..hbone import headers as hbone_headers
from ..telemetry.access import ConnectionRecord
from ..telemetry.logs import Span
from ..telemetry.metrics import Peer
from . import sockets
from .common import format_duration
from .fastpath_common import Tunnel, TunnelSink
from .flowcache import InboundClass, InboundEntry, inbound_entry
from .inbound import _forwarded_host

log = logging.getLogger("ztunnel_fast.proxy.inbound")  # the lines are the inbound path's
MAX_RECORDS = 64  # cached records per flow (one per `forwarded` value); beyond this they start over


class InboundFastPath(TunnelSink):
    log = log
    swapped = True  # the plain socket is the app (the server): what it sent is the response direction

    def __init__(self, ctx):
        self._init_tunnels(ctx)
        self.loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self.entries: dict[int, InboundEntry] = {}  # flow id -> entry (installed now)
        self.installed: dict[InboundClass, int] = {}
        self.by_conn: dict[int, list[InboundClass]] = {}  # connection id -> its installed classes
        # flow id -> `forwarded` -> (the state it was made under, the class's first ConnectionRecord)
        self._records: dict[int, dict[str, tuple]] = {}
        self.active = True
        self._answered = self.loop.create_future()  # the response of every stream the workers answered
        self._answered.set_result(None)
        self.engine.inbound_sink = self

    # -- decisions ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Forget every installed verdict (a state or policy change is about to apply), then take
        the tunnels the workers opened on them before the flush (queued events) under the state
        they were decided in."""
        self.installed.clear()
        self.by_conn.clear()
        if not self.engine._closed:
            self.core.inflow_flush(0)
            self.engine._on_events()
        self.entries.clear()
        self._records.clear()

    def drain(self) -> None:
        if self.active and not self.engine._closed:
            _, hits, handed, flushes = self.core.inflow_stats
            log.info("inbound fast path: %d CONNECTs answered by the workers, %d handed back, %d flushes",
                     hits, handed, flushes)
        self.active = False
        self.flush()

    def learn(self, stream, *, peer, peer_id, arrived_on, target, workload, info, decision, source,
              scope=None) -> None:
        """Inbound._stream allowed this CONNECT (no await since the decision): cache its class
        when it may be.  `scope`: the Inbound's context (a pod's PodScope in in-pod mode, whose
        upstream sockets belong in the pod's netns: not cached, the workers dial in their own)."""
        conn = stream.conn
        conn_id = getattr(conn, "id", None)
        if not self.active or conn_id is None or conn.lost is not None or conn.goaway_sent:
            return
        authority = None
        for name, value in stream.request_headers:
            if name == ":authority":
                authority = value
        if authority is None:
            return
        flow = InboundClass(conn_id, authority)
        if flow in self.installed:
            return
        entry = inbound_entry(flow, peer=peer, peer_id=peer_id, arrived_on=arrived_on, target=target,
                              workload=workload, info=info, decision=decision, source=source,
                              own_netns=(scope if scope is not None else self.ctx).socket_factory is None)
        if entry is None:
            return
        flow_id = next(self._ids)
        self.entries[flow_id] = entry
        self.installed[flow] = flow_id
        self.by_conn.setdefault(conn_id, []).append(flow)
        config = self.ctx.config
        ip, port = target
        self.core.inflow_install(conn_id, authority.encode(), flow_id, ip.packed, port,
                                 source.packed if source is not None else b"", config.packet_mark or 0,
                                 config.connect_timeout,
                                 (sockets.KEEPALIVE_IDLE, sockets.KEEPALIVE_INTERVAL, sockets.KEEPALIVE_COUNT))

    def forget(self, conn) -> None:
        """An inbound connection is over (after its EV_CLOSED): its entries go."""
        conn_id = getattr(conn, "id", None)
        flows = self.by_conn.pop(conn_id, None)
        if not flows:
            return
        if not self.engine._closed:
            self.core.inflow_flush(conn_id)
        for flow in flows:
            flow_id = self.installed.pop(flow, None)
            if flow_id is not None:
                self.entries.pop(flow_id, None)
                self._records.pop(flow_id, None)

    # -- events from the workers (NativeEngine._dispatch) ---------------------------------------
    def on_open(self, conn_id: int, token: int, sid: int, fd: int, flow_id: int, start_ns: int, fields) -> None:
        """A worker answered a CONNECT with 200 and spliced it: Inbound._stream's opening lines,
        metrics and tracking (the tracking once the poll is dispatched: _track_fresh)."""
        ctx = self.ctx
        entry = self.entries.get(flow_id)
        conn = self.engine._conns.get(conn_id)
        authority, trace, forwarded = request_telemetry(fields)
        if conn is None or entry is None or authority != entry.flow.authority:  # cannot happen: entries outlive their opens
            log.error("inbound fast path: tunnel of unknown flow %d on connection %d", flow_id, conn_id)
            self._orphan(token, fd, conn, sid)
            return
        stream = NativeStream(conn, sid, response=self._answered)
        stream.responded = stream.attached = True
        conn.streams[sid] = stream
        conn.streams_opened += 1
        trace = trace or hbone_headers.new_trace_id()
        span = Span("inbound", {"id": trace, "peer_ip": entry.peer[0], "peer_id": entry.peer_id})
        if log.isEnabledFor(logging.INFO):
            log.info("got CONNECT request to %s", hbone_headers.format_addr(*entry.target), extra={"span": span})
        start = start_ns / 1e9  # CLOCK_MONOTONIC, as time.monotonic()
        records = self._records.get(flow_id)
        if records is None:
            records = self._records[flow_id] = {}
        proto = records.get(forwarded)
        if proto is None or proto[0] is not ctx.state:  # the class's first tunnel (per `forwarded`)
            workload = entry.workload
            record = ConnectionRecord(
                ctx.metrics,
                direction="inbound",
                src_addr=entry.peer,
                dst_addr=entry.target,
                hbone_addr=entry.target,
                source=Peer(ctx.state.workload_by_ip(entry.peer[0], ctx.config.network), entry.peer_id),
                destination=Peer(workload, workload.identity),
                service=ctx.service_by_hostname(_forwarded_host(forwarded)),
                mtls=True,
            )
            record.start = start
            if len(records) >= MAX_RECORDS:  # `forwarded` is the peer's: bounded memory
                records.clear()
            records[forwarded] = (ctx.state, record)
        else:
            record = proto[1].again(entry.peer, start)
        self._opened(token, Tunnel(conn, sid, fd, span, record, start, ctx, entry=entry))

    def _track(self, tunnel: Tunnel, future) -> None:
        """Policy changes track it too (ConnectionManager.reevaluate cancels a now-denied one)."""
        tunnel.tracked = self.ctx.connections.track(tunnel.entry.workload, tunnel.entry.info, tunnel.span, task=future)

    def on_end(self, token: int, kind: int, code: int, err: int, sent: int, received: int) -> None:
        """A fast-path tunnel's completion: Inbound._stream's closing lines and metrics."""
        tunnel = self._ended(token)
        if tunnel is not None and not self._settled(tunnel):
            self._finish(tunnel, kind, code, err, sent, received)

    def _failed(self, tunnel: Tunnel, error: str, duration: float) -> None:
        """As Inbound._stream: the duration is the completion's."""
        log.warning("failed dur=%s err=%s", format_duration(duration), error, extra={"span": tunnel.span})

    def _cancelled(self, tunnel: Tunnel) -> None:
        """Drain or a policy change gave up on the tunnel: its worker resets it (the completion follows)."""
        if tunnel.done:
            return
        stream = tunnel.conn.streams.get(tunnel.sid)
        if stream is not None:
            stream.reset_code = ErrorCodes.CANCEL
        if not self.engine._closed and tunnel.conn.lost is None:
            self.core.reset(tunnel.conn.worker, tunnel.conn.id, tunnel.sid, ErrorCodes.CANCEL)


def request_telemetry(fields) -> tuple[str | None, str | None, str]:
    """(:authority, trace id, `forwarded`) of a request the worker answered, as check_connect reads
    them (the last of a repeated field wins; the worker passed only printable ASCII values, with
    :method CONNECT and the :authority of the entry, which the event loop's path accepted)."""
    authority = traceparent = None
    forwarded = ""
    for name, value in fields:
        if name == b"traceparent":
            traceparent = value.decode()
        elif name == b"forwarded":
            forwarded = value.decode()
        elif name == b":authority":
            authority = value.decode()
    return authority, hbone_headers.trace_id_of(traceparent), forwarded
