"""The outbound fast path's control side (ZTUNNEL_FAST_PATH, native engine only): the native
workers accept on the outbound listener themselves and carry the connections of flow classes the
event loop has decided once; this module installs those decisions and turns the workers' batched
events into the same logs, access log lines and metrics as the event loop's path.

Flow: a worker accepts -> looks the class up in the engine's flow cache -> hit: opens the CONNECT
stream on the pooled HBONE connection the entry names, attaches the socket on 200, and reports
EV_FAST_OPEN then the completion; miss (or anything unusual): the socket comes here (EV_ACCEPTED)
and Outbound.handle, the reference path, serves it on a pooled connection and, once its CONNECT is
answered, calls `learn`, which installs an entry on that connection when proxy/flowcache.py says
the class may be cached.

Invariants:
- Listeners: node mode registers its outbound listener (id 1); in-pod mode one per pod (inpod/
  podproxy.py), each with its own miss handler, Outbound (upstream sockets in the pod's netns)
  and scope; the listener id is part of every flow class, and HBONE connections are per
  (listener, pool key).  A listener id names its scope's IPv4 and IPv6 sockets alike (dual
  stack); the flow class's addresses carry the family.  `unlisten` (a pod's DelPod or removal from a snapshot, before its ack)
  shuts the socket down, so the kernel stops listening for every worker's dup at once, and
  drops the listener's entries before it returns.
- `flush` runs at the top of every state change (ProxyContext.replace_state, the path of every
  source) before the new state is in place: the engine's table is emptied under its lock, so no
  connection accepted after the change is served from an entry decided before it.
- One set of HBONE connections: the fast path rides the pool's (the node's, or the pod's in in-pod
  mode), so a destination gets the connections the event loop's path alone would open.  A
  connection an entry names is `fast_enabled` from its first entry on: the worker picks the id of
  every stream on it, the event loop's too (engine/native.py NativeConnection), one ascending
  sequence.  When a worker turns a tunnel away at the connection's stream limit
  (min(POOL_MAX_STREAMS_PER_CONNECTION, the peer's SETTINGS_MAX_CONCURRENT_STREAMS), counting
  every stream) it says so with the hand-over (EV_ACCEPTED names the connection: `fast_full`, which
  the pool reads until a stream on it ends); the event loop's path then gets another pooled
  connection (the pool dials one when all are full) and its `learn` moves the class onto it.  No
  stream is opened on a connection after its GOAWAY either way (the worker checks; our GOAWAY
  flushes its entries first), and the pool's idle close of a shared connection is a GOAWAY (the
  worker closes it when its last stream is done).  Python's `fast_streams` lags the worker (events
  come in batches), so "full" is the worker's word, never inferred from it.
- Worker connections: a connection is owned by one worker, which runs every stream on it, so a
  class whose connection worker A owns is handed over to A by every other worker that accepts it.
  A worker that hands one class over ZTUNNEL_FAST_PATH_HANDOVER_RATE times or more in a second
  says so (EV_FLOW_HOT, once per entry and worker); the class's pool then dials one more
  connection for the key, owned by that worker (`HbonePool.add`, shared at once), and every
  installed class of that (listener, pool key) is installed again naming it: from then on that
  worker opens the class's streams on its own connection, as Envoy's per-worker pools do.  A quiet
  destination keeps ztunnel's one connection per key (the rate is per second, per class); a key
  has at most one connection per worker this way, and each is pooled like any other (the event
  loop's path may ride it, the idle release closes it).  A worker connection that goes leaves its
  classes on the others (the table moves a class's primary to one that is left).
- `learn` installs nothing decided before the latest flush (`generation`): the decision was made
  before the CONNECT's await, the install comes after it.
- Every fast-path tunnel is tracked like a handler task (ctx.track), so drain waits for it, once
  the poll that opened it is dispatched (NativeEngine.after_batch: no await comes in between; a
  tunnel whose completion came in that same poll is never tracked); a tunnel cancelled by drain is
  reset by its worker.
- Per-connection cost: the ConnectionRecord of a flow id is built once and copied per tunnel
  (ConnectionRecord.again); logs, access log lines and metrics are the same.
- A socket the workers hand over is owned here from its event on and closed exactly once.
- Imported only with the native engine (engine/native.py is imported at module level).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time

from h2.errors import ErrorCodes

from ..engine import abort
from ..errors import HttpStatus, StreamReset
from ..hbone import headers as hbone_headers
from ..hbone.base import _reason
from ..hbone.pool import PoolKey
from ..telemetry.logs import Span
from . import sockets
from .common import _report_crash, format_duration
from .fastpath_common import Tunnel, TunnelSink, abort_fd
from .flowcache import FlowClass, FlowEntry, addr16, flow_entry
from .outbound import connection_record

log = logging.getLogger("ztunnel_fast.proxy.outbound")  # the lines are the outbound path's

END_PENDING = 0x100  # EV_STREAM_END flag: the stream ended before its CONNECT was answered
RETIRED_KEEP = 10.0  # seconds an entry outlives its flush (EV_FAST_OPEN of a lookup just before it)


class _Listener:
    """One outbound listener the workers accept on: node mode's, or a pod's (in-pod mode), with
    its sockets (dual stack: the IPv4 and the IPv6 one share the id, the scope and the handler)."""

    __slots__ = ("lid", "socks", "handle", "scope", "open_connections")

    def __init__(self, lid, sock, handle, scope, open_connections):
        self.lid = lid
        self.socks = [sock]
        self.handle = handle  # the event loop's path for a miss (Outbound.handle, or the pod's wrapper)
        self.scope = scope  # ProxyContext, or the pod's PodScope: source workload, track, dedicated
        self.open_connections = open_connections  # the pod's workloadState outbound list, or None


class FastPath(TunnelSink):
    log = log

    def __init__(self, ctx, outbound):
        self._init_tunnels(ctx)
        self.outbound = outbound
        self.loop = asyncio.get_running_loop()
        self.max_streams = ctx.config.pool_max_streams_per_connection
        self.generation = 0  # flushes so far: `learn` installs only what was decided after the last one
        self._ids = itertools.count(1)
        self._lids = itertools.count(1)
        self.listeners: dict[int, _Listener] = {}  # listener id -> what the workers accept on
        self._by_scope: dict[int, _Listener] = {}  # id(scope) -> its listener
        self.entries: dict[int, FlowEntry] = {}  # flow id -> entry (kept while tunnels use it)
        self.installed: dict[FlowClass, int] = {}  # what the engine's table holds now
        self.uses: dict[int, int] = {}  # flow id -> live tunnels
        self.shared: dict[int, object] = {}  # connection id -> the pooled NativeConnection entries ride
        self.flow_conns: dict[int, list] = {}  # flow id -> the connections it was installed with (primary first)
        # (listener id, pool key) -> worker -> the shared connection of that key the worker owns
        self.worker_conns: dict[tuple[int, PoolKey], dict[int, object]] = {}
        self._dialing: set[tuple[int, PoolKey, int]] = set()  # worker connections being dialled
        self._noted: dict[int, dict] = {}  # token -> the pod's workloadState list it is noted in
        self._records: dict[int, object] = {}  # flow id -> its first tunnel's ConnectionRecord (copied per tunnel)
        self._retired: dict[int, float] = {}  # flow id -> when it stopped being installed
        self.listening = False  # some listener is registered
        self._stopped = False  # drain: no listener is registered any more
        self.engine.fast_sink = self
        self.core.flow_handover_rate = ctx.config.fast_path_handover_rate

    # -- the listeners --------------------------------------------------------------------------
    def listen(self, lsock: socket.socket, *, handle=None, scope=None,
               open_connections: dict | None = None) -> int | None:
        """The workers accept on `lsock` from now on (the event loop does not); returns its
        listener id, or None after drain (the caller serves it itself).  Node mode: the defaults;
        in-pod mode: the pod's handler and PodScope (its pool dials in its netns).  A scope's second
        socket (its IPv6 listener beside the IPv4 one) joins the scope's listener id: the flow
        classes' addresses tell the families apart."""
        if self._stopped or self.engine._closed:
            return None
        lst = self._by_scope.get(id(scope or self.ctx))
        if lst is None:
            lst = _Listener(next(self._lids), lsock, handle or self.outbound.handle, scope or self.ctx,
                            open_connections)
        else:
            lst.socks.append(lsock)
        lid = lst.lid
        self.core.listen(lsock.fileno(), (sockets.KEEPALIVE_IDLE, sockets.KEEPALIVE_INTERVAL,
                                          sockets.KEEPALIVE_COUNT), lid)
        self.listeners[lid] = lst
        self._by_scope[id(lst.scope)] = lst
        self.listening = True
        return lid

    def unlisten(self, lid: int) -> None:
        """Listener `lid` is going (its pod removed, or drain), synchronously: the kernel stops
        listening (shutdown: every worker's dup at once, its queue reset) and its entries leave the
        engine's table, so no connection is accepted or served from its entries after this returns.
        The caller closes the socket; the pod's pool says GOAWAY on its connections."""
        lst = self.listeners.pop(lid, None)
        if lst is None:
            return
        if self._by_scope.get(id(lst.scope)) is lst:
            del self._by_scope[id(lst.scope)]
        self.listening = bool(self.listeners)
        for lsock in lst.socks:
            try:
                lsock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        if not self.engine._closed:
            self.core.flow_flush_listener(lid)
            self.core.unlisten(lid)  # each worker closes its dup (EPOLLHUP already told it)
        for flow in [f for f in self.installed if f.listener == lid]:
            del self.installed[flow]
        for wkey in [k for k in self.worker_conns if k[0] == lid]:
            del self.worker_conns[wkey]  # the pod's pool says GOAWAY on them
        self._drop_unused()

    def drain(self) -> None:
        """No new connections through the workers (the pool's drain says GOAWAY on the connections)."""
        if self.listeners and not self.engine._closed:
            _, hits, misses, flushes = self.core.flow_stats
            log.info("fast path: %d connections carried by the workers, %d by the event loop's path, "
                     "%d flushes", hits, misses, flushes)
        self._stopped = True
        for lid in list(self.listeners):
            self.unlisten(lid)
        self.listening = False
        self.flush()

    # -- decisions ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Forget every installed decision (a state or policy change is about to apply)."""
        self.generation += 1
        if not self.engine._closed:
            self.core.flow_flush(0)
        self.installed.clear()
        self._drop_unused()

    def learn(self, route, source, key: PoolKey, conn, client_ip, dst_ip, dst_port: int, generation: int,
              scope=None) -> None:
        """Outbound.handle decided `route` for this connection (before the flush count was
        `generation`) and its CONNECT was answered on the pooled connection `conn`: cache the class
        there when it may be.  `scope`: the Outbound's context (a pod's PodScope in in-pod mode),
        which names the listener.  A class installed on another connection moves onto `conn` (the
        event loop's path got `conn` because that one was full or going)."""
        if generation != self.generation or not self._usable(conn):
            return
        lst = self._by_scope.get(id(scope if scope is not None else self.ctx))
        if lst is None:  # not a listener of the workers (its pod is going, or drained)
            return
        flow = FlowClass(client_ip, dst_ip, dst_port, lst.lid)
        flow_id = self.installed.get(flow)
        conns = self.flow_conns.get(flow_id, ()) if flow_id is not None else ()
        if any(c is conn for c in conns) and not any(c.fast_full for c in conns):
            return  # installed with it already, and no worker finds a connection of the class full
        entry = flow_entry(flow, route, source, key, dedicated=lst.scope.dedicated)
        if entry is None:
            return
        if not conn.fast_enabled:
            self._share(conn)
        self.worker_conns.setdefault((lst.lid, key), {})[conn.worker] = conn  # its worker's, from now on
        self._install(entry, conn)

    def _usable(self, conn) -> bool:
        """New tunnels may ride `conn`: a native connection, not lost, no GOAWAY either way."""
        return (getattr(conn, "engine", None) is self.engine and conn.lost is None and not conn.goaway_sent
                and not conn.goaway_received)

    def _open(self, conn) -> bool:
        """A worker connection a class may name now: usable and no worker found it full."""
        return self._usable(conn) and not conn.fast_full

    def _share(self, conn) -> None:
        """The workers may open streams on `conn` from now on (its stream ids become theirs to pick:
        the command goes before any entry naming it can be found)."""
        conn.fast_enabled = True
        self.shared[conn.id] = conn
        self.core.fast_enable(conn.worker, conn.id, self.max_streams)
        conn.closed.add_done_callback(lambda _f, conn=conn: self._conn_closed(conn))

    def _install(self, entry: FlowEntry, conn) -> None:
        """Install `entry` on `conn`, with the worker connections of its (listener, pool key)."""
        flow_id = next(self._ids)
        self.entries[flow_id] = entry
        old = self.installed.get(entry.flow)
        self.installed[entry.flow] = flow_id
        f = entry.flow
        others = [c for w, c in self.worker_conns.get((f.listener, entry.key), {}).items()
                  if w != conn.worker and self._open(c)]
        self.flow_conns[flow_id] = [conn, *others]
        self.core.flow_install(addr16(f.src_ip), addr16(f.dst_ip), f.dst_port, conn.id, conn.worker, flow_id,
                               entry.prefix, entry.fwd_host, entry.suffix, f.listener,
                               tuple((c.worker, c.id) for c in others))
        if old is not None:
            self._drop_unused()

    def on_hot(self, flow_id: int, worker: int) -> None:
        """EV_FLOW_HOT: `worker` hands class `flow_id` over at the handover rate: dial it a
        connection of the class's pool key that it owns (once at a time per key and worker)."""
        entry = self.entries.get(flow_id)
        if entry is None or self.installed.get(entry.flow) != flow_id:  # flushed or replaced since
            return
        lst = self.listeners.get(entry.flow.listener)
        if lst is None or self._stopped:
            return
        own = self.worker_conns.get((lst.lid, entry.key), {}).get(worker)
        dial = (lst.lid, entry.key, worker)
        if dial in self._dialing:
            return
        if own is not None and self._open(own):  # it was full when the class was installed: name it again
            self._install_key(lst.lid, entry.key)
            return
        self._dialing.add(dial)
        task = self.loop.create_task(self._add_worker_conn(lst, entry.key, worker), name=f"worker-connection-{worker}")
        task.add_done_callback(_report_crash)
        lst.scope.track(task)

    async def _add_worker_conn(self, lst: _Listener, key: PoolKey, worker: int) -> None:
        """Dial the connection, pool it, share it, and install every class of its key again with it."""
        try:
            conn = await lst.scope.pool.add(key, worker=worker)
        except Exception as exc:  # the class stays on the connections it has
            log.warning("fast path: no connection of its own for worker %d to %s: %s", worker,
                        hbone_headers.format_addr(*key.next_hop), exc)
            return
        finally:
            self._dialing.discard((lst.lid, key, worker))
        if self.listeners.get(lst.lid) is not lst or self._stopped or not self._usable(conn):
            return  # its listener went meanwhile: the pool's idle release closes it
        log.debug("fast path: worker %d opens the streams to %s on a connection of its own", worker,
                  hbone_headers.format_addr(*key.next_hop))
        self.worker_conns.setdefault((lst.lid, key), {})[worker] = conn
        self._share(conn)
        self._install_key(lst.lid, key)

    def _install_key(self, lid: int, key: PoolKey) -> None:
        """Install every class of (listener, pool key) again, on its connection, with the worker
        connections of the key as they are now."""
        for flow, flow_id in list(self.installed.items()):
            entry = self.entries[flow_id]
            if flow.listener == lid and entry.key == key:
                self._install(entry, self.flow_conns[flow_id][0])

    def _drop_unused(self) -> None:
        """Forget entries no longer installed, unused, and retired long enough ago that no worker
        can still be opening a tunnel it looked up before the flush (a lookup and its
        EV_FAST_OPEN are microseconds apart; RETIRED_KEEP is seconds)."""
        now = time.monotonic()
        live = set(self.installed.values())
        for flow_id in [i for i in self.entries if i not in live]:
            retired = self._retired.setdefault(flow_id, now)
            if not self.uses.get(flow_id) and now - retired >= RETIRED_KEEP:
                del self.entries[flow_id]
                del self._retired[flow_id]
                self.uses.pop(flow_id, None)
                self.flow_conns.pop(flow_id, None)
                self._records.pop(flow_id, None)

    def _conn_closed(self, conn) -> None:
        """A shared connection went: its classes stay on their other worker connections, if any
        (the table takes it out of every entry the same way)."""
        self.shared.pop(conn.id, None)
        if not self.engine._closed:
            self.core.flow_flush(conn.id)
        for wkey, owned in list(self.worker_conns.items()):
            if owned.get(conn.worker) is conn:
                del owned[conn.worker]
                if not owned:
                    del self.worker_conns[wkey]
        for flow, flow_id in list(self.installed.items()):
            conns = self.flow_conns.get(flow_id)
            if conns and any(c is conn for c in conns):
                conns[:] = [c for c in conns if c is not conn]
                if not conns:
                    del self.installed[flow]
        self._drop_unused()

    # -- events from the workers (NativeEngine._dispatch) ---------------------------------------
    def on_accepted(self, fd: int, lid: int = 1, full: int = 0) -> None:
        """A miss: the reference path of its listener serves the connection (and may install an
        entry).  A listener removed since (its pod deleted) resets it, as a closed listener
        resets the connections left in its queue.  `full`: the shared connection a worker
        turned it away from at its stream limit (0: another reason): the pool skips it until a
        stream on it ends, and the class's next `learn` moves it to the connection the pool gave."""
        if full:
            conn = self.engine._conns.get(full)
            if conn is not None:
                conn.fast_full = True
        sock = socket.socket(fileno=fd)
        lst = self.listeners.get(lid)
        if lst is None:
            abort(sock)
            return
        sock.setblocking(False)
        task = self.loop.create_task(lst.handle(sock), name=f"outbound-{fd}")
        task.add_done_callback(_report_crash)
        lst.scope.track(task)

    def on_open(self, conn_id: int, token: int, sid: int, fd: int, client_port: int, flow_id: int,
                accepted_ns: int, data: bytes) -> None:
        """A worker opened a fast-path tunnel: the event loop's path's opening lines and metrics."""
        entry = self.entries.get(flow_id)
        conn = self.engine._conns.get(conn_id)
        if entry is None or conn is None:  # cannot happen: entries live while tunnels use them
            log.error("fast path: tunnel of unknown flow %d on connection %d", flow_id, conn_id)
            self._orphan(token, fd, conn, sid)
            return
        # the class's source is the client's address (the lookup matched all 16 bytes of it)
        client = (entry.flow.src_ip, client_port)
        route = entry.route
        span = Span("outbound", {"id": data[:32].decode()})
        start = accepted_ns / 1e9  # CLOCK_MONOTONIC, as time.monotonic()
        if log.isEnabledFor(logging.INFO):
            log.info("proxy to %s using HBONE via %s type %s", route.authority,
                     hbone_headers.format_addr(*route.next_hop), route.via.value, extra={"span": span})
        proto = self._records.get(flow_id)
        if proto is None:  # the class's first tunnel: its record is the one the others copy
            record = self._records[flow_id] = connection_record(self.ctx, client, route, entry.source)
            record.start = start
        else:
            record = proto.again(client, start)
        lst = self.listeners.get(entry.flow.listener)
        scope = self.ctx if lst is None else lst.scope  # a pod's drain waits for its tunnels
        tunnel = Tunnel(conn, sid, fd, span, record, start, scope, flow_id=flow_id)
        uses = self.uses
        uses[flow_id] = uses.get(flow_id, 0) + 1
        conn.fast_streams = getattr(conn, "fast_streams", 0) + 1
        if lst is not None and lst.open_connections is not None:  # the pod's workloadState, as PodProxy notes its own
            lst.open_connections[token] = {"src": hbone_headers.format_addr(*client),
                                           "originalDst": hbone_headers.format_addr(entry.flow.dst_ip, entry.flow.dst_port),
                                           "actualDst": hbone_headers.format_addr(*route.next_hop),
                                           "protocol": "HBONE"}
            self._noted[token] = lst.open_connections
        self._opened(token, tunnel)

    def on_status(self, token: int, status: int) -> None:
        tunnel = self.tunnels.get(token)
        if tunnel is not None:
            tunnel.status = status

    def on_end(self, token: int, kind: int, code: int, err: int, sent: int, received: int) -> None:
        """A fast-path tunnel's completion: the event loop's path's closing lines and metrics."""
        tunnel = self._ended(token)
        if tunnel is None:
            return
        if self._noted:
            noted = self._noted.pop(token, None)
            if noted is not None:
                noted.pop(token, None)
        conn = tunnel.conn
        conn.fast_streams -= 1
        conn.idle_since = time.monotonic()
        flow_id = tunnel.flow_id
        uses = self.uses
        left = uses[flow_id] = uses[flow_id] - 1
        if not left and flow_id in self._retired:
            self._drop_unused()
        if self._settled(tunnel):  # drained: Outbound.handle's CancelledError branch
            return
        if kind & END_PENDING or tunnel.status:
            # no tunnel was attached: the CONNECT failed, as pool.open_stream raises it
            if tunnel.status:
                exc = HttpStatus(tunnel.status, _reason(tunnel.status))
            else:
                exc = conn.lost if conn.lost is not None else StreamReset(code or ErrorCodes.CANCEL)
            self._failed(tunnel, str(exc))
            tunnel.record.complete(0, 0, str(exc), getattr(exc, "flag", "CONNECT"))
            abort_fd(tunnel.fd)
            return
        self._finish(tunnel, kind, code, err, sent, received)

    def _failed(self, tunnel: Tunnel, error: str, duration: float | None = None) -> None:
        """As Outbound._failed: the duration is the one at the time of the line."""
        log.warning("failed dur=%s err=%s", format_duration(time.monotonic() - tunnel.start), error,
                    extra={"span": tunnel.span})

    def _cancelled(self, tunnel: Tunnel) -> None:
        """Drain gave up on the tunnel: its worker resets it (the completion follows)."""
        if not tunnel.done and not self.engine._closed:
            self.core.reset(tunnel.conn.worker, tunnel.conn.id, tunnel.sid, ErrorCodes.CANCEL)
