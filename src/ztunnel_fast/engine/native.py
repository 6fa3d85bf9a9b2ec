"""The native engine: tunnels moved by compiled code (_splice) on worker threads, GIL released.

`NativeEngine` starts ZTUNNEL_WORKER_THREADS workers (each an edge-triggered epoll loop in C) and
watches their event queue's eventfd from the asyncio loop.

- Plain<->plain tunnels (`splice`) go to a worker: splice(2) through a pipe, zero copy.
- HBONE connections (`connection`): after the pyOpenSSL handshake the worker owns the socket and
  the SSL*: HTTP/2 framing, flow control, PING/SETTINGS, GOAWAY, limits, all in C.  Header blocks
  are HPACK-decoded by the worker (libnghttp2, one decoder per connection, in frame order) and come
  here as field lists; a block that does not decode is the worker's COMPRESSION_ERROR.  Ours are
  encoded here (a stateless encoder: dynamic table size 0) and handed to the worker to send.
- `tunnel(plain, stream)` attaches the plain socket to the stream in its worker: every chunk is
  moved in C, the event loop hears only the completion.

Invariants: sockets stay owned by the control layer, which closes them only after the completion
(EV_STREAM_END / EV_SPLICE_DONE / EV_CLOSED: by then the worker has let go of the fd and SSL*);
a cancelled tunnel is reset by its worker and that completion awaited before CancelledError
propagates; a pyOpenSSL connection is kept alive until its EV_CLOSED.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time

from h2.errors import ErrorCodes

from .. import _splice  # ImportError here means "no native engine"
from ..errors import HttpStatus, StreamReset
from ..hbone.base import PING_INTERVAL, PING_TIMEOUT, ConnectionLost, ConnectionState, _code_name, _reason
from ..hbone.hpack_cache import StatelessEncoder
from ..proxy.sockets import close_later
from . import ssl_bridge
from .base import Completion

log = logging.getLogger(__name__)

# _splice event kinds (worker -> event loop)
EV_SPLICE_DONE, EV_HEADERS, EV_STREAM_END, EV_SETTINGS, EV_GOAWAY, EV_ERROR, EV_CLOSED = range(1, 8)
EV_FAST_OPEN, EV_ACCEPTED, EV_FAST_STATUS = 8, 9, 10  # the outbound fast path (proxy/fastpath.py)
EV_INBOUND_OPEN = 11  # the inbound fast path (proxy/fastpath_inbound.py)
EV_STREAM_ID = 12  # the id a worker gave a stream opened on a connection the fast path shares
EV_FLOW_HOT = 13  # a worker hands a flow class over often enough to want a connection of its own
INBOUND_TOKEN = 1 << 61  # with FAST_TOKEN: tokens of inbound fast-path tunnels
FAST_TOKEN = 1 << 62  # tokens of fast-path tunnels (issued by the workers)
# how a stream ended
END_CLEAN, END_PEER_RESET, END_LOCAL_RESET, END_IO, END_CONN, END_REFUSED, END_NOSTREAM, END_PROTOCOL = range(8)
ECANCELED = 125

_splice.set_ssl_functions(*ssl_bridge.functions())


def _io_error(err: int) -> str:
    return f"io error: {os.strerror(err)} (os error {err})"


async def _settle(fut: asyncio.Future):
    """Wait for a completion even while being cancelled (the worker must let go of the fds first)."""
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            continue
    return fut.result()


def stream_completion(result, start: float) -> Completion:
    """An EV_STREAM_END of an attached stream as the engine boundary's Completion (pure-twin wording)."""
    kind, code, err, sent, received = result
    duration = time.monotonic() - start
    if kind == END_CLEAN:
        return Completion(sent, received, duration)
    if kind == END_IO and err:
        return Completion(sent, received, duration, error=_io_error(err), reset=True)
    return Completion(sent, received, duration, error=str(StreamReset(code or ErrorCodes.CANCEL)), reset=True)


class NativeEngine:
    name = "native"

    def __init__(self, workers: int = 2):
        self.loop = asyncio.get_running_loop()
        self.core = _splice.Core(workers)
        self.workers = workers
        self._tokens = itertools.count(1)
        self._rr = itertools.cycle(range(workers))
        self._splices: dict[int, asyncio.Future] = {}
        self._tunnels: dict[int, asyncio.Future] = {}
        self._conns: dict[int, NativeConnection] = {}
        self._closed = False
        self._pure = None  # the pure twin's engine, for pure connections' streams (built on first use)
        self.fast_sink = None  # proxy/fastpath.FastPath when ZTUNNEL_FAST_PATH is on
        self.inbound_sink = None  # proxy/fastpath_inbound.InboundFastPath, same switch
        self._after_batch: list = []  # callables run once the events of a poll are dispatched
        # completion batching (ZTUNNEL_FAST_PATH_BATCH_WINDOW, set by the fast paths), seconds; 0: off
        self.batch_window = 0.0
        self._batch_timer: asyncio.TimerHandle | None = None  # ends the hold (_end_hold)
        self.loop.add_reader(self.core.event_fd, self._on_events)

    @property
    def events_emitted(self) -> int:
        return self.core.events_emitted

    def next_worker(self) -> int:
        return next(self._rr)

    def next_token(self) -> int:
        return next(self._tokens)

    # -- events from the workers ----------------------------------------------------------------
    def after_batch(self, fn) -> None:
        """Run `fn()` once the events of the poll being dispatched are (no await in between: the
        fast paths track a tunnel for drain there, unless its completion came in the same poll)."""
        self._after_batch.append(fn)

    def _on_events(self) -> None:
        """Dispatch every queued event (the eventfd's reader; a flush's or close's drain).

        Completion batching: a poll that took deferrable events (a fast-path tunnel's opening,
        status or end: `Core.polled_deferrable`) holds the queue for `batch_window`, so the ones
        that follow wait for the timer and come in one batch instead of one wake-up each, as a NIC
        coalesces interrupts.  Any other event still wakes the event loop at once, and its poll
        takes the held ones too.  A timer whose poll finds no deferrable event lets go: a quiet
        tunnel's completion is seen at once."""
        for ev in self.core.poll():
            try:
                self._dispatch(ev)
            except Exception:
                log.exception("native engine: failed to handle event %r", ev[:9])
        after = self._after_batch
        while after:
            fn = after.pop()
            try:
                fn()
            except Exception:
                log.exception("native engine: failed to finish a batch of events")
        if self.batch_window and self._batch_timer is None and self.core.polled_deferrable and not self._closed:
            self.core.events_held = True
            self._batch_timer = self.loop.call_later(self.batch_window, self._end_hold)

    def _end_hold(self) -> None:
        self._batch_timer = None
        self.core.events_held = False
        self._on_events()

    def _dispatch(self, ev) -> None:
        kind, ident, token, sid, code, flags, err, a, b, data = ev
        if kind == EV_SPLICE_DONE:
            fut = self._splices.pop(ident, None)
            if fut is not None and not fut.done():
                fut.set_result((a, b, err))
            return
        if kind == EV_STREAM_ID:
            conn = self._conns.get(ident)
            if conn is not None:
                conn._on_stream_id(token, sid, code)
            return
        if (kind >= EV_FAST_OPEN or token & FAST_TOKEN) and self._dispatch_fast(ev):
            return
        conn = self._conns.get(ident)
        if kind == EV_STREAM_END and token:
            fut = self._tunnels.pop(token, None)
            if fut is not None and not fut.done():
                fut.set_result((flags, code, err, a, b))
        if conn is None:
            return
        if kind == EV_HEADERS:
            conn._on_headers(sid, flags, data)
        elif kind == EV_STREAM_END:
            conn._on_stream_end(sid, flags, code)
        elif kind == EV_SETTINGS:
            conn._peer_max_streams = a
        elif kind == EV_GOAWAY:
            conn._on_goaway(sid, code, data or b"")
        elif kind == EV_ERROR:
            conn._on_error(code, (data or b"").decode("utf-8", "replace"))
        elif kind == EV_CLOSED:
            self._conns.pop(ident, None)
            conn._on_closed(flags, err, (data or b"").decode("utf-8", "replace"))

    def _dispatch_fast(self, ev) -> bool:
        """Events of the outbound fast path; True when nothing else is to be done with `ev`."""
        kind, ident, token, sid, code, flags, err, a, b, data = ev
        if kind == EV_INBOUND_OPEN or token & INBOUND_TOKEN:
            inbound = self.inbound_sink
            if kind == EV_INBOUND_OPEN:
                if inbound is None:  # nobody installed a verdict: cannot happen
                    os.close(code)
                else:
                    inbound.on_open(ident, token, sid, code, a, b, data)
                return True
            if kind == EV_STREAM_END and inbound is not None:
                inbound.on_end(token, flags, code, err, a, b)
            return False  # the connection's own bookkeeping follows (_on_stream_end)
        sink = self.fast_sink
        if kind == EV_ACCEPTED:
            if sink is None:
                os.close(a)
            else:
                sink.on_accepted(a, sid, ident)  # sid: its listener; ident: the fast-path conn found full, or 0
            return True
        if sink is None:
            if kind == EV_FAST_OPEN:
                os.close(code)  # the engine stopped listening for nobody: cannot happen
            return kind != EV_STREAM_END
        if kind == EV_FAST_OPEN:
            sink.on_open(ident, token, sid, code, flags, a, b, data)
            return True
        if kind == EV_FLOW_HOT:
            sink.on_hot(ident, sid)  # ident: the flow id; sid: the worker
            return True
        if kind == EV_FAST_STATUS:
            sink.on_status(token, code)
            return True
        if kind == EV_STREAM_END:
            sink.on_end(token, flags, code, err, a, b)
        return False  # the connection's own bookkeeping follows (_on_stream_end)

    # -- plain <-> plain --------------------------------------------------------------------------
    async def splice(self, plain: socket.socket, upstream: socket.socket, tunnel_id: str) -> Completion:
        start = time.monotonic()
        if self._closed:
            return Completion(0, 0, 0.0, error="native engine stopped", reset=True)
        token = self.next_token()
        worker = self.next_worker()
        fut = self.loop.create_future()
        self._splices[token] = fut
        self.core.splice(worker, token, plain.fileno(), upstream.fileno())
        try:
            sent, received, err = await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not self._closed:
                self.core.splice_cancel(worker, token)
            await _settle(fut)
            raise
        error = _io_error(err) if err else None
        return Completion(sent, received, time.monotonic() - start, error=error, reset=bool(err))

    # -- HBONE ------------------------------------------------------------------------------------
    def connection(self, sock, tls, *, client, settings, on_request=None, name="hbone", peer_identity=None,
                   worker: int | None = None):
        """`worker`: the worker that is to own it (the fast path's worker connections); None: the next
        in turn."""
        return NativeConnection(self, sock, tls, client=client, settings=settings, on_request=on_request,
                                name=name, peer_identity=peer_identity, worker=worker)

    async def tunnel(self, plain: socket.socket, stream, tunnel_id: str) -> Completion:
        if not isinstance(stream, NativeStream):  # a pure connection's stream (not built by this engine)
            if self._pure is None:
                # imported here: the pure twin's hyper-h2 stack (~0.8 MiB of idle RSS) stays unloaded
                # while every connection is native (tests/unit/test_lazy_imports.py)
                from .pure import PureEngine

                self._pure = PureEngine()
            return await self._pure.tunnel(plain, stream, tunnel_id)
        start = time.monotonic()
        conn = stream.conn
        if stream.closed or conn.lost is not None or self._closed:
            code = stream.reset_code if stream.reset_code is not None else ErrorCodes.CANCEL
            return stream_completion((END_NOSTREAM, code, 0, 0, 0), start)
        token = self.next_token()
        fut = self.loop.create_future()
        self._tunnels[token] = fut
        stream.attached = True
        self.core.attach(conn.worker, conn.id, stream.id, plain.fileno(), token)
        try:
            result = await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not self._closed:
                self.core.reset(conn.worker, conn.id, stream.id, ErrorCodes.CANCEL)
            stream.reset_code = stream.reset_code if stream.reset_code is not None else ErrorCodes.CANCEL
            await _settle(fut)
            raise
        return stream_completion(result, start)

    def close(self) -> None:
        """Stop the workers; every tunnel and connection they still held completes."""
        if self._closed:
            return
        self._closed = True
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        try:
            self.loop.remove_reader(self.core.event_fd)
        except (ValueError, OSError, RuntimeError):
            pass
        self.core.stop()
        self._on_events()
        for fut in self._splices.values():
            if not fut.done():
                fut.set_result((0, 0, ECANCELED))
        for fut in self._tunnels.values():
            if not fut.done():
                fut.set_result((END_CONN, ErrorCodes.CANCEL, 0, 0, 0))
        for conn in list(self._conns.values()):
            conn._on_closed(7, 0, "engine stopped")
        self._splices.clear()
        self._tunnels.clear()
        self._conns.clear()


# ------------------------------------------------------------------------------------------------
# HBONE connections owned by a worker
# ------------------------------------------------------------------------------------------------
_REQUEST_PSEUDO = {b":method", b":scheme", b":authority", b":path", b":protocol"}
_CONNECTION_HEADERS = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
CLOSE_LOCAL, CLOSE_PEER, CLOSE_IO, CLOSE_PROTOCOL, CLOSE_GOAWAY, CLOSE_KEEPALIVE, CLOSE_DRAINED, CLOSE_STOP = range(8)
HF_END_STREAM, HF_TRAILERS, HF_IGNORED, HF_RESPONSE = 1, 2, 4, 8


def malformed_request(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request header list is malformed (RFC 9113 8.2, 8.3), or None.  A malformed request
    is a stream error PROTOCOL_ERROR (the Rust h2 crate under ztunnel does the same)."""
    seen: set[bytes] = set()
    regular = False
    for name, value in headers:
        if name != name.lower():
            return "uppercase header name"
        if name.startswith(b":"):
            if regular:
                return "pseudo-header after a regular header"
            if name not in _REQUEST_PSEUDO or name in seen:
                return f"invalid or repeated pseudo-header {name!r}"
            seen.add(name)
        else:
            regular = True
            if name in _CONNECTION_HEADERS or (name == b"te" and value != b"trailers"):
                return f"connection-specific header {name!r}"
    if b":method" not in seen:
        return "no :method"
    method = dict(headers)[b":method"]
    if method == b"CONNECT" and b":protocol" not in seen:
        if b":scheme" in seen or b":path" in seen or b":authority" not in seen:
            return "CONNECT needs :authority and no :scheme/:path"
    elif b":scheme" not in seen or b":path" not in seen:
        return "request without :scheme or :path"
    return None


def _text(raw) -> list[tuple[str, str]] | None:
    try:
        return [(k.decode(), v.decode()) for k, v in raw]
    except UnicodeDecodeError:
        return None


class NativeStream:
    """One CONNECT stream of a NativeConnection; its bytes move only through engine.tunnel()."""

    def __init__(self, conn: NativeConnection, stream_id: int, request_headers=None, eof: bool = False,
                 response: asyncio.Future | None = None):
        self.conn = conn
        self.id = stream_id
        self.request_headers: list[tuple[str, str]] = request_headers or []
        # `response`: a done future for a stream whose response is no one's to await (the inbound
        # fast path's, answered by its worker), shared by all of them: no future per stream
        self.response: asyncio.Future = conn.loop.create_future() if response is None else response
        self.eof = eof  # peer sent END_STREAM with its headers
        self.ended = False  # we sent END_STREAM
        self.reset_code: int | None = None
        self.responded = False
        self.closed = False
        self.attached = False

    def respond(self, status: int, headers: list[tuple[str, str]] | None = None, end: bool = False) -> None:
        if self.reset_code is not None:
            raise StreamReset(self.reset_code)
        if self.closed or self.conn.lost is not None:
            raise StreamReset(ErrorCodes.STREAM_CLOSED)
        self.responded = True
        if end:
            self.ended = True
        conn = self.conn
        block = conn._encode([(":status", str(status))] + (headers or []))
        conn.engine.core.respond(conn.worker, conn.id, self.id, block, end)

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        if self.reset_code is not None:
            return
        self.reset_code = code
        conn = self.conn
        if self.id and not self.closed and conn.lost is None and not conn.engine._closed:
            conn.engine.core.reset(conn.worker, conn.id, self.id, code)  # no id yet: sent with it (_on_stream_id)
        self._fail_response(StreamReset(code))

    def _fail_response(self, exc: Exception) -> None:
        if not self.response.done():
            self.response.set_exception(exc)
            self.response.exception()  # retrieved: whoever awaits it still gets it, nobody else warns

    def _on_end(self, kind: int, code: int) -> None:
        self.closed = True
        if kind != END_CLEAN and self.reset_code is None:
            self.reset_code = code if kind != END_IO else ErrorCodes.CANCEL
        if self.response.done():  # answered (or already failed): nothing to fail
            return
        if self.conn.lost is not None:
            self._fail_response(self.conn.lost)
        else:
            self._fail_response(StreamReset(self.reset_code if self.reset_code is not None else ErrorCodes.CANCEL))


class NativeConnection(ConnectionState):
    """The control layer's handle on an HBONE connection a worker owns (same interface as the pure
    HboneConnection: start, start_stream, response, on_request, can_open, goaway, close, closed,
    lost, streams, idle_since, goaway_sent/received, peer_identity, name).

    A client connection the outbound fast path shares (`fast_enabled`, proxy/fastpath.py): its
    worker opens streams on it too, so from then on the worker picks the id of every stream the
    event loop opens (CMD_OPEN with sid 0, EV_STREAM_ID), one ascending sequence for both; the
    stream waits in `_opening` under its token until then.  `fast_streams` counts the fast path's
    live tunnels on it (from its events: it may lag the worker by one batch), `fast_full` says a
    worker found it at its stream limit (cleared when any stream ends); the pool sees both.  Its
    GOAWAY first takes it out of the workers' flow table and always lets the worker close it once
    its last stream, ours or the fast path's, is done."""

    def __init__(self, engine: NativeEngine, sock: socket.socket, tls, *, client: bool, settings,
                 on_request=None, name: str = "hbone", peer_identity=None, worker: int | None = None):
        super().__init__(sock, tls, client=client, settings=settings, on_request=on_request, name=name,
                         peer_identity=peer_identity)
        self.engine = engine
        self.id = engine.next_token()
        self.worker = engine.next_worker() if worker is None else worker % engine.workers
        self._peer_max_streams = 2**31 - 1  # until the peer's SETTINGS arrive (EV_SETTINGS)
        self._next_sid = 1
        self._started = False
        self.fast_enabled = False
        self.fast_streams = 0
        self.fast_full = False
        self._opening: dict[int, NativeStream] = {}  # token -> stream whose id the worker is picking
        # stateless HPACK encoder: a block the worker drops (stream gone) cannot desynchronise the peer
        self._encoder = StatelessEncoder()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        values = (s.stream_window, s.connection_window, s.max_frame_size, s.max_concurrent_streams,
                  s.max_header_list_size, int(PING_INTERVAL * 1000), int(PING_TIMEOUT * 1000))
        ssl = ssl_bridge.ssl_pointer(self.tls)
        self.engine._conns[self.id] = self
        self._started = True
        self.engine.core.adopt(self.worker, self.id, self.sock.fileno(), ssl, self.client, values)

    def peer_max_streams(self) -> int:
        return self._peer_max_streams

    @property
    def active_streams(self) -> int:
        return len(self.streams) + len(self._opening) + self.fast_streams

    def can_open(self, pool_limit: int) -> bool:
        return not self.fast_full and super().can_open(pool_limit)

    def close_idle(self) -> None:
        """A worker may open a stream on a shared connection at any moment: GOAWAY first (it is
        closed once that stream, if any, is done), never a close under it."""
        if self.fast_enabled:
            self.goaway()
        else:
            self.close()

    def goaway(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Graceful: no new streams; open streams finish; the worker closes when idle."""
        if self.goaway_sent or self.lost is not None:
            return
        self.goaway_sent = True
        if not self.fast_enabled and not self.streams and not self._opening:
            self.close()
        elif not self.engine._closed:
            if self.fast_enabled:  # no worker opens another stream on it (its entries go first)
                self.engine.core.flow_flush(self.id)
            self.engine.core.goaway(self.worker, self.id, error_code)

    def close(self, error: Exception | None = None) -> None:
        if self.lost is not None:
            return
        self.lost = error or ConnectionLost("connection closed")
        self._lose_streams()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self._started and not self.engine._closed and self.id in self.engine._conns:
            self.engine.core.close_conn(self.worker, self.id, error is None)  # EV_CLOSED releases the socket
        else:
            self._release(error)

    def _lose_streams(self) -> None:
        for stream in list(self._opening.values()):
            stream.reset_code = ErrorCodes.CANCEL
            stream._fail_response(self.lost)
        for stream in list(self.streams.values()):
            if stream.reset_code is None:
                stream.reset_code = ErrorCodes.CANCEL
            stream._fail_response(self.lost)
        if not any(s.attached for s in self.streams.values()):
            self.streams.clear()

    def _release(self, error) -> None:
        self.streams.clear()
        self._opening.clear()
        self.tls = None  # the worker is done with the SSL*: pyOpenSSL may free it
        # FIN behind the worker's last frames (a GOAWAY), a bounded drain, then close: never an RST
        # that would discard them (proxy/sockets.py says why)
        close_later(self.sock)
        if not self.closed.done():
            self.closed.set_result(error)

    # -- client side ------------------------------------------------------------------------
    def start_stream(self, headers: list[tuple[str, str]]) -> NativeStream:
        if self.lost is not None:
            raise self.lost
        self.streams_opened += 1
        if self.fast_enabled:  # the worker picks the id (the fast path opens streams on it too)
            token = self.engine.next_token()
            stream = NativeStream(self, 0, headers)
            self._opening[token] = stream
            self.engine.core.open_stream(self.worker, self.id, 0, self._encode(headers), token)
            return stream
        sid = self._next_sid
        self._next_sid += 2
        stream = NativeStream(self, sid, headers)
        self.streams[sid] = stream
        self.engine.core.open_stream(self.worker, self.id, sid, self._encode(headers))
        return stream

    async def response(self, stream: NativeStream) -> None:
        headers = await stream.response
        status = int(dict(headers).get(":status", "0") or 0)
        if status != 200:
            stream.reset(ErrorCodes.CANCEL)
            raise HttpStatus(status, _reason(status))

    def _encode(self, headers) -> bytes:
        return self._encoder.encode(headers)

    # -- events from the worker -------------------------------------------------------------
    def _on_headers(self, sid: int, flags: int, raw: list[tuple[bytes, bytes]]) -> None:
        """A header block the worker decoded (the raw fields, in order)."""
        if flags & (HF_IGNORED | HF_TRAILERS):
            return
        if flags & HF_RESPONSE:
            stream = self.streams.get(sid)
            if stream is not None and not stream.response.done():
                stream.response.set_result(_text(raw) or [(":status", "0")])
            return
        self._on_request(sid, raw, bool(flags & HF_END_STREAM))

    def _on_request(self, sid: int, raw, eof: bool) -> None:
        headers = _text(raw)
        stream = NativeStream(self, sid, headers or [], eof=eof)
        self.streams[sid] = stream
        self.streams_opened += 1
        if self.on_request is None or self.goaway_sent or self.lost is not None:
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return
        why = malformed_request(raw)
        if why is not None:
            log.warning("%s: reset stream %d (PROTOCOL_ERROR): malformed request: %s", self.name, sid, why)
            stream.reset(ErrorCodes.PROTOCOL_ERROR)
            return
        if headers is None:
            log.warning("%s: refused CONNECT with 400 Bad Request on stream %d: header block is not valid UTF-8",
                        self.name, sid)
            stream.respond(400, end=True)
            return
        self._spawn(self.on_request(stream), f"{self.name}-stream-{sid}")

    def _on_stream_id(self, token: int, sid: int, code: int) -> None:
        """The worker gave the stream of `token` its id (0: refused, with `code`)."""
        stream = self._opening.pop(token, None)
        if stream is None:
            return
        if not sid:
            stream._on_end(END_REFUSED, code)
            self._maybe_idle()
            return
        stream.id = sid
        self.streams[sid] = stream
        if stream.reset_code is not None and self.lost is None and not self.engine._closed:
            self.engine.core.reset(self.worker, self.id, sid, stream.reset_code)  # reset before it had its id

    def _on_stream_end(self, sid: int, kind: int, code: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream._on_end(kind, code)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        self.fast_full = False  # a stream ended: a worker may open one again
        if not self.active_streams:
            self.idle_since = time.monotonic()

    def _on_goaway(self, last: int, code: int, data: bytes) -> None:
        self.goaway_received = True
        if code:
            log.info("%s: peer sent GOAWAY %s: %s", self.name, _code_name(code), data)

    def _on_error(self, code: int, reason: str) -> None:
        log.warning("%s: closing connection, %s (GOAWAY %s)", self.name, reason, _code_name(code))
        self.goaway_sent = True
        if self.lost is None:
            self.lost = ConnectionLost(reason)
            self._lose_streams()

    def _on_closed(self, kind: int, err: int, reason: str) -> None:
        error = self.lost
        if error is None:
            if kind == CLOSE_KEEPALIVE:
                log.warning("%s: no PING ack for %.0fs, dropping connection", self.name, PING_TIMEOUT)
            if kind == CLOSE_IO and err:
                reason = f"{reason}: {_io_error(err)}"
            elif kind == CLOSE_IO:
                reason = _tls_reason(reason)
            if kind not in (CLOSE_DRAINED, CLOSE_LOCAL):
                error = ConnectionLost(reason if kind != CLOSE_GOAWAY or "error" in reason
                                       else "peer sent GOAWAY NO_ERROR")
            self.lost = error or ConnectionLost("connection closed")
            self._lose_streams()
        for stream in list(self.streams.values()) + list(self._opening.values()):
            stream._on_end(END_CONN, ErrorCodes.CANCEL)
        for task in list(self._tasks):
            task.cancel()
        self._release(error if kind not in (CLOSE_LOCAL, CLOSE_DRAINED) else None)


def _tls_reason(reason: str) -> str:
    """'connection error: tlsv13 alert certificate required' -> the handshake module's wording."""
    from ..tls.handshake import _REASONS

    _, _, detail = reason.partition(": ")
    phrase = _REASONS.get(detail.lower())
    if phrase and "alert" in detail:
        return f"peer rejected the connection: {phrase}"
    return reason
