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
- Entries are forgotten with the flush, their connection (`forget`, after its EV_CLOSED, when no
  EV_INBOUND_OPEN of it can still be queued) or their pod (`forget_scope`); a tunnel keeps its
  own reference to its entry.
- In-pod mode: a pod's entries carry its network namespace fd (PodScope.netns), in which the
  workers create the upstream socket (setns there and back, under the table's lock; a failure
  hands the CONNECT back).  The pod's removal (PodProxy.stop_accepting, before the DelWorkload's
  or snapshot's ack, and before the fd is closed) calls `forget_scope`: the engine drops the
  pod's entries and moves the generation under that lock, so once it returns no worker uses the
  fd and no dial looked up before opens a tunnel; the queue is drained like `flush`'s.  A stopped
  pod (PodScope.stopped) or a closed fd is never installed again.  SO_MARK and the spoofed source
  are the event loop's path's (packet_mark; the peer's IP when the pod's orig_src is on).
- A tunnel is tracked for drain by the scope its verdict was learnt in (a pod's PodScope: the
  pod's drain waits for it, as for Inbound._stream's task).
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
        self.scopes: dict[int, object] = {}  # flow id -> the scope it was learnt in (ctx or a PodScope)
        self._scope_ids: dict[object, int] = {}  # PodScope -> the engine's id of its entries
        self._scope_seq = itertools.count(1)
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
        self.scopes.clear()
        self._scope_ids.clear()

    def forget_scope(self, scope) -> None:
        """A pod is being removed (synchronously, before its ack and before its namespace fd is
        closed): no worker dials for it once this returns; the tunnels they opened before are
        taken here (queued events) and drain with the pod."""
        scope_id = self._scope_ids.pop(scope, None)
        if scope_id is None:
            return
        if not self.engine._closed:
            self.core.inflow_flush_scope(scope_id)
            self.engine._on_events()
        for flow_id in [f for f, s in self.scopes.items() if s is scope]:
            del self.scopes[flow_id]
            entry = self.entries.pop(flow_id, None)
            self._records.pop(flow_id, None)
            if entry is None:
                continue
            flow = entry.flow
            if self.installed.get(flow) == flow_id:
                del self.installed[flow]
            flows = self.by_conn.get(flow.conn_id)
            if flows is not None and flow in flows:
                flows.remove(flow)
                if not flows:
                    del self.by_conn[flow.conn_id]

    def drain(self) -> None:
        if self.active and not self.engine._closed:
            _, hits, handed, flushes = self.core.inflow_stats
            log.info("inbound fast path: %d CONNECTs answered by the workers, %d handed back, %d flushes, "
                     "%d pod namespace errors", hits, handed, flushes, self.core.inflow_netns_errors)
        self.active = False
        self.flush()

    def learn(self, stream, *, peer, peer_id, arrived_on, target, workload, info, decision, source,
              scope=None) -> None:
        """Inbound._stream allowed this CONNECT (no await since the decision): cache its class
        when it may be.  `scope`: the Inbound's context (a pod's PodScope in in-pod mode, whose
        upstream sockets the workers create in the pod's network namespace)."""
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
        scope = scope if scope is not None else self.ctx
        netns = scope_netns(scope)
        entry = inbound_entry(flow, peer=peer, peer_id=peer_id, arrived_on=arrived_on, target=target,
                              workload=workload, info=info, decision=decision, source=source, netns=netns)
        if entry is None:
            return
        scope_id = 0
        if netns is not None:
            scope_id = self._scope_ids.get(scope)
            if scope_id is None:
                scope_id = self._scope_ids[scope] = next(self._scope_seq)
        flow_id = next(self._ids)
        self.entries[flow_id] = entry
        self.installed[flow] = flow_id
        self.scopes[flow_id] = scope
        self.by_conn.setdefault(conn_id, []).append(flow)
        config = self.ctx.config
        ip, port = target
        self.core.inflow_install(conn_id, authority.encode(), flow_id, ip.packed, port,
                                 source.packed if source is not None else b"", config.packet_mark or 0,
                                 config.connect_timeout,
                                 (sockets.KEEPALIVE_IDLE, sockets.KEEPALIVE_INTERVAL, sockets.KEEPALIVE_COUNT),
                                 netns if netns is not None else -1, scope_id)

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
                self.scopes.pop(flow_id, None)

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
        self._opened(token, Tunnel(conn, sid, fd, span, record, start, self.scopes.get(flow_id, ctx), entry=entry))

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


def scope_netns(scope) -> int | None:
    """Where the upstream sockets of `scope` are created: None our own namespace (no socket
    factory), a pod's open namespace fd, or -1 when that is not (any more) possible: a stopped
    pod, a closed fd, a factory without a pod namespace."""
    if scope.socket_factory is None:
        return None
    if getattr(scope, "stopped", True):
        return -1
    netns = getattr(scope, "netns", None)
    fd = getattr(netns, "fd", -1)
    return fd if isinstance(fd, int) else -1


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
