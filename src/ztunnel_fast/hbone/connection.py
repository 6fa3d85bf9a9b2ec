"""One HBONE connection: HTTP/2 (hyper-h2) over a handshaken pyOpenSSL connection, on asyncio.

This is the pure twin's HBONE leg (the native engine drives its connections in C; what both share
is in base.py, re-exported here).  The h2 state machine is the sans-IO core; this module is its thin driver: bytes from the TLS
socket go into h2, events come out and are routed to streams, h2's output is written back.

Invariants:
- Payload memory is bounded by flow control: received DATA is credited back to the peer only
  after the consumer took it (`HboneStream.consumed`), and writers wait for send window, and
  for our outgoing buffer to drain below HIGH_WATER, before handing h2 more data.
- A protocol error from the peer ends this connection with the GOAWAY code h2 chose, never the
  process; other connections are untouched.
- Once GOAWAY was sent or received, the connection accepts no new streams (the pool never reuses it).
- The same answers as the native engine (tests/e2e/test_bad_input.py compares them frame by frame):
  a stream beyond our MAX_CONCURRENT_STREAMS is refused with RST_STREAM REFUSED_STREAM and the
  connection lives on (RFC 9113 5.1.2), REFUSED_STREAM_LIMIT such refusals per window end it with
  ENHANCE_YOUR_CALM; an undecodable header block ends it with COMPRESSION_ERROR; reading stops while
  OUT_READ_STOP bytes of our output wait (a peer flooding PING/SETTINGS without reading the acks
  cannot make us buffer without bound).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from typing import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, SettingsFrame
from OpenSSL import SSL

from ..errors import HttpStatus, StreamReset
from ..proxy.sockets import close_later
from .base import (
    PING_INTERVAL,
    PING_TIMEOUT,
    ConnectionLost,
    ConnectionState,
    H2Settings,
    _code_name,
    _reason,
)

log = logging.getLogger(__name__)

CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 3.4
READ_SIZE = 256 * 1024  # bytes per SSL_read attempt: a few TLS records, one syscall worth
HIGH_WATER = 1024 * 1024  # outgoing bytes buffered before writers wait for the socket
RESET_FLOOD_LIMIT = 100  # peer resets of unanswered streams tolerated per RESET_FLOOD_WINDOW
RESET_FLOOD_WINDOW = 10.0  # seconds; beyond the limit: GOAWAY ENHANCE_YOUR_CALM ("rapid reset")
REFUSED_STREAM_LIMIT = 1000  # streams refused beyond MAX_CONCURRENT_STREAMS per window (native engine's)
REFUSED_STREAM_WINDOW = 10.0  # seconds; beyond the limit: GOAWAY ENHANCE_YOUR_CALM
OUT_READ_STOP = 2 * 1024 * 1024  # bytes of our output waiting before we stop reading (native OBUF_READ_STOP)


class _EagerFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer checks a frame's length only once its whole body has arrived, so a peer
    announcing a 16 MiB frame makes us buffer 16 MiB before refusing it.  Check the length as
    soon as the 9-byte header is in (FRAME_SIZE_ERROR), as the Rust h2 crate does."""

    def __next__(self):
        if len(self._data) >= 9:
            self._validate_frame_length(int.from_bytes(self._data[:3], "big"))
        return super().__next__()


class _UndecodableHeaderBlock(h2.exceptions.ProtocolError):
    """An HPACK decoding failure: the shared compression context is lost, a connection error
    COMPRESSION_ERROR (RFC 9113 4.3).  h2 itself says PROTOCOL_ERROR (or ENHANCE_YOUR_CALM for an
    oversized list); the native engine says COMPRESSION_ERROR for both, and so do we."""

    error_code = ErrorCodes.COMPRESSION_ERROR


class _Flood(h2.exceptions.ProtocolError):
    """A peer abusing a cheap request (streams beyond the limit, rapid reset): ENHANCE_YOUR_CALM,
    raised from the frame that crossed the limit, so no later frame is answered (as native)."""

    error_code = ErrorCodes.ENHANCE_YOUR_CALM


class _H2Connection(h2.connection.H2Connection):
    """hyper-h2 with graceful GOAWAY, REFUSED_STREAM beyond the stream limit and COMPRESSION_ERROR.

    h2 treats any GOAWAY, sent or received, as the end of the connection and refuses to send
    anything afterwards.  RFC 9113 6.8 lets streams up to the GOAWAY's last stream id finish, and
    HBONE drains exactly that way (ztunnel sends GOAWAY on drain and lets tunnels complete).  So
    after a NO_ERROR GOAWAY the state machine stays open; this driver itself refuses new streams
    (`goaway_sent` / `goaway_received`).  An error GOAWAY still closes the connection.
    """

    def _receive_goaway_frame(self, frame):
        before = self.state_machine.state
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == 0 and before is not h2.connection.ConnectionState.CLOSED:
            self.state_machine.state = before
        return frames, events

    def close_connection(self, error_code=0, additional_data=None, last_stream_id=None):
        before = self.state_machine.state
        super().close_connection(error_code, additional_data, last_stream_id)
        if error_code == 0 and before is not h2.connection.ConnectionState.CLOSED:
            self.state_machine.state = before

    # h2 makes a stream beyond our MAX_CONCURRENT_STREAMS a connection error; RFC 9113 5.1.2 and the
    # native engine refuse just that stream.  While `_admit_beyond_limit` is set, h2's own count
    # check is lifted, the stream is opened (its header block decoded: HPACK state follows every
    # block, its id becomes the highest seen) and reset with REFUSED_STREAM at once.
    _admit_beyond_limit = False
    _refused_times: collections.deque | None = None

    @property
    def open_inbound_streams(self) -> int:
        count = h2.connection.H2Connection.open_inbound_streams.fget(self)
        return 0 if self._admit_beyond_limit else count

    def _receive_headers_frame(self, frame):
        refuse = (not self.config.client_side and frame.stream_id not in self.streams
                  and self.open_inbound_streams >= self.local_settings.max_concurrent_streams)
        self._admit_beyond_limit = refuse
        try:
            frames, events = super()._receive_headers_frame(frame)
        except h2.exceptions.ProtocolError as exc:
            if isinstance(exc.__cause__, hpack.HPACKError):
                # the GOAWAY names this stream as the last one, as the native engine's does (it
                # takes the stream id before the block is decoded)
                if frame.stream_id % 2 == 1 and frame.stream_id > self.highest_inbound_stream_id:
                    self.highest_inbound_stream_id = frame.stream_id
                raise _UndecodableHeaderBlock(f"undecodable header block ({exc.__cause__})") from exc
            raise
        finally:
            self._admit_beyond_limit = False
        if not refuse:
            return frames, events
        self.reset_stream(frame.stream_id, ErrorCodes.REFUSED_STREAM)
        self._count_refusal()  # after the RST, as native: the refusal that crosses the limit is sent too
        return frames, [e for e in events if getattr(e, "stream_id", None) != frame.stream_id]

    _reset_times: collections.deque | None = None

    def _receive_rst_stream_frame(self, frame):
        """Rapid reset (CVE-2023-44487): a peer cancelling streams before we could answer them."""
        stream = self.streams.get(frame.stream_id)
        if (not self.config.client_side and stream is not None and frame.stream_id % 2 == 1
                and not stream.state_machine.headers_sent):
            now = time.monotonic()
            if self._reset_times is None:
                self._reset_times = collections.deque()
            times = self._reset_times
            times.append(now)
            while now - times[0] > RESET_FLOOD_WINDOW:
                times.popleft()
            if len(times) > RESET_FLOOD_LIMIT:
                raise _Flood(f"peer reset {RESET_FLOOD_LIMIT + 1} streams before they were answered")
        return super()._receive_rst_stream_frame(frame)

    def _count_refusal(self) -> None:
        now = time.monotonic()
        if self._refused_times is None:
            self._refused_times = collections.deque()
        times = self._refused_times
        times.append(now)
        while now - times[0] > REFUSED_STREAM_WINDOW:
            times.popleft()
        if len(times) > REFUSED_STREAM_LIMIT:
            raise _Flood("peer kept opening streams beyond the limit")


class HboneStream:
    """One CONNECT stream: a byte pipe with flow control, half-close and reset."""

    def __init__(self, conn: "HboneConnection", stream_id: int, request_headers=None):
        self.conn = conn
        self.id = stream_id
        self.request_headers: list[tuple[str, str]] = request_headers or []
        self.response: asyncio.Future = conn.loop.create_future()
        self._chunks: collections.deque = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._unacked = 0
        self.eof = False  # peer sent END_STREAM
        self.ended = False  # we sent END_STREAM
        self.reset_code: int | None = None  # set when the stream was reset (either side)
        self.responded = False  # server side: HEADERS answered
        self.closed = False

    # -- receiving --------------------------------------------------------------------------
    async def read(self) -> bytes:
        """Next chunk of payload; b"" at END_STREAM; raises StreamReset on RST_STREAM."""
        while not self._chunks:
            if self.reset_code is not None:
                raise StreamReset(self.reset_code)
            if self.eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data, flow = self._chunks.popleft()
        self._unacked += flow
        return data

    def consumed(self) -> None:
        """The last chunks were delivered downstream: give the window back to the peer."""
        if self._unacked:
            self._acknowledge(self._unacked)
            self._unacked = 0

    def _acknowledge(self, flow: int) -> None:
        """Credit `flow` bytes back.  h2 credits the connection window even when the stream is
        already closed (and skips the stream's own window then), which is what a closed stream needs."""
        if self.conn.lost is not None:
            return
        try:
            self.conn.h2.acknowledge_received_data(flow, self.id)
        except (h2.exceptions.ProtocolError, KeyError, ValueError):
            return
        self.conn.flush()

    # -- sending ----------------------------------------------------------------------------
    async def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        conn = self.conn
        while view:
            if self.reset_code is not None:
                raise StreamReset(self.reset_code)
            if conn.lost is not None:
                raise conn.lost
            try:
                window = conn.h2.local_flow_control_window(self.id)
            except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
                raise StreamReset(self.reset_code or ErrorCodes.STREAM_CLOSED) from None
            if window <= 0:
                self._writable.clear()
                await self._writable.wait()
                continue
            n = min(len(view), window, conn.h2.max_outbound_frame_size)
            conn.h2.send_data(self.id, bytes(view[:n]))
            view = view[n:]
            conn.flush()
            await conn.drained()

    def end(self) -> None:
        """Half-close: an empty DATA frame with END_STREAM."""
        if self.ended or self.reset_code is not None or self.conn.lost is not None:
            return
        self.ended = True
        try:
            self.conn.h2.end_stream(self.id)
        except h2.exceptions.ProtocolError:
            return
        self.conn.flush()
        self._maybe_done()

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        if self.reset_code is not None:
            return
        self.reset_code = code
        if self.conn.lost is None:
            try:
                self.conn.h2.reset_stream(self.id, code)
            except h2.exceptions.ProtocolError:
                pass
            self.conn.flush()
        self._wake()
        self._done()

    # -- server side ------------------------------------------------------------------------
    def respond(self, status: int, headers: list[tuple[str, str]] | None = None, end: bool = False) -> None:
        if self.reset_code is not None:
            raise StreamReset(self.reset_code)
        self.responded = True
        self.conn.h2.send_headers(self.id, [(":status", str(status))] + (headers or []), end_stream=end)
        if end:
            self.ended = True
        self.conn.flush()
        if end:
            self._maybe_done()

    # -- events from the connection ---------------------------------------------------------
    def _on_data(self, data: bytes, flow: int) -> None:
        if data:
            self._chunks.append((data, flow))
        elif flow:
            self.conn.h2.acknowledge_received_data(flow, self.id)  # padding only
        self._readable.set()

    def _on_end(self) -> None:
        self.eof = True
        self._readable.set()
        self._maybe_done()

    def _on_reset(self, code: int) -> None:
        if self.reset_code is None:
            self.reset_code = code
        if self.conn.client and not self.response.done():
            self.response.set_exception(StreamReset(code))
        self._wake()
        self._done()

    def _wake(self) -> None:
        self._readable.set()
        self._writable.set()

    def _maybe_done(self) -> None:
        if self.eof and self.ended:
            self._done()

    def _done(self) -> None:
        if not self.closed:
            self.closed = True
            if self.reset_code is not None:
                # A reset stream's unread bytes will never be consumed, yet they count against the
                # connection window: credit them, or every such stream shrinks it for good and the
                # pooled connection eventually stalls.  (A cleanly ended stream's reader still
                # drains its chunks and credits them through consumed().)
                leftover = self._unacked + sum(flow for _, flow in self._chunks)
                self._chunks.clear()
                self._unacked = 0
                if leftover:
                    self._acknowledge(leftover)
            self.conn._stream_done(self)


RequestHandler = Callable[[HboneStream], Awaitable[None]]


class HboneConnection(ConnectionState):
    """The HTTP/2 side of one mTLS connection, client or server."""

    def __init__(
        self,
        sock: socket.socket,
        tls: SSL.Connection,
        *,
        client: bool,
        settings: H2Settings,
        on_request: RequestHandler | None = None,
        name: str = "hbone",
        peer_identity=None,
    ):
        super().__init__(sock, tls, client=client, settings=settings, on_request=on_request, name=name,
                         peer_identity=peer_identity)
        # Header values stay bytes inside h2 (header_encoding=None): a peer's non-UTF-8 bytes
        # are refused per stream (400) by us instead of raising out of the frame parser.
        self.h2 = _H2Connection(h2.config.H2Configuration(client_side=client, header_encoding=None))
        self.h2.incoming_buffer = _EagerFrameBuffer(server=not client)
        self._out = bytearray()
        self._writer_active = False
        self._drain_waiters: list[asyncio.Future] = []
        self._ping_outstanding: float | None = None
        self._read_paused = False  # reading stopped while OUT_READ_STOP bytes of output wait
        self._read_stopped = False  # reading stopped for good after an error GOAWAY
        self._fd = sock.fileno()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        local = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
        }
        if self.client:
            local[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        else:
            local[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = s.max_concurrent_streams
        self.h2.local_settings = h2.settings.Settings(client=self.client, initial_values=local)
        # h2 derives its inbound frame limit from local settings only when they change on ACK;
        # ours are current from the start, so apply the limit now (a peer cannot exceed the
        # default before it has seen our SETTINGS anyway).
        self.h2.max_inbound_frame_size = s.max_frame_size
        self.h2.incoming_buffer.max_frame_size = s.max_frame_size
        self.h2.initiate_connection()
        # h2's SETTINGS frame lists every setting it knows; send only ours, as the native engine does
        self.h2.data_to_send()
        self._out += (CLIENT_PREFACE if self.client else b"") + SettingsFrame(0, settings=local).serialize()
        extra = s.connection_window - 65_535  # the RFC's initial connection window
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        self.loop.add_reader(self._fd, self._on_readable)
        self.flush()
        self._spawn(self._keepalive(), f"{self.name}-keepalive")
        # TLS may already hold decrypted bytes read during the handshake.
        self.loop.call_soon(self._on_readable)

    def peer_max_streams(self) -> int:
        return self.h2.remote_settings.max_concurrent_streams

    def goaway(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Graceful: no new streams; open streams finish; the connection closes when idle."""
        if self.goaway_sent or self.lost is not None:
            return
        self.goaway_sent = True
        self.h2.close_connection(error_code=error_code)
        self.flush()
        if not self.streams:
            self.close()

    def close(self, error: Exception | None = None) -> None:
        if self.lost is not None:
            return
        self._write_last()
        self.lost = error or ConnectionLost("connection closed")
        try:
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
        except (ValueError, OSError):
            pass
        for stream in list(self.streams.values()):
            stream._on_reset(ErrorCodes.CANCEL)
        self.streams.clear()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(self.lost)
        self._drain_waiters.clear()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        try:
            if error is None:
                self.tls.shutdown()
        except SSL.Error:
            pass
        # FIN behind our last frames (a GOAWAY), a bounded drain, then close: never an RST that
        # would discard them (proxy/sockets.py says why)
        close_later(self.sock)
        if not self.closed.done():
            self.closed.set_result(error)

    # -- client side ------------------------------------------------------------------------
    def start_stream(self, headers: list[tuple[str, str]]) -> HboneStream:
        """Send a CONNECT's HEADERS now (synchronously, so the pool can count the stream).

        Raises the connection's error when it is already gone: with TLS 1.3 a server that
        rejects our certificate does so after our handshake completed, so a fresh connection
        can die before its first stream.
        """
        if self.lost is not None:
            raise self.lost
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=False)
        stream = HboneStream(self, stream_id, headers)
        self.streams[stream_id] = stream
        self.streams_opened += 1
        self.flush()
        return stream

    async def response(self, stream: HboneStream) -> None:
        """Wait for the CONNECT response; raise HttpStatus unless it is 200."""
        headers = await stream.response
        status = int(dict(headers).get(":status", "0"))
        if status != 200:
            stream.reset(ErrorCodes.CANCEL)
            raise HttpStatus(status, _reason(status))

    # -- I/O --------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        # a call queued by call_soon may come after an error GOAWAY stopped reading: h2 would
        # raise again on the bytes that followed and queue a second GOAWAY
        if self.lost is not None or self._read_stopped:
            return
        events = []
        try:
            while True:
                try:
                    data = self.tls.recv(READ_SIZE)
                except SSL.WantReadError:
                    break
                except SSL.WantWriteError:
                    break
                if not data:
                    raise SSL.ZeroReturnError()
                events.extend(self.h2.receive_data(data))
                if len(events) > 4096:
                    break  # let other work run; we are called again while data is pending
                self._out += self.h2.data_to_send()
                if len(self._out) >= OUT_READ_STOP:
                    break
        except h2.exceptions.ProtocolError as exc:
            self._dispatch(events)
            code = getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR)
            # a flood is abuse within the protocol's rules, worded as the native engine words it
            what = str(exc) if isinstance(exc, _Flood) else f"peer violated HTTP/2: {exc}"
            log.warning("%s: closing connection, %s (GOAWAY %s)", self.name, what, _code_name(code))
            self.goaway_sent = True
            pending = self.h2.data_to_send()
            if not pending:
                # h2 raises some errors (a bad client preface) before queueing its GOAWAY
                pending = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=code).serialize()
            self._out += pending
            self.flush()
            self.loop.call_later(0.1, self.close, exc)  # let the GOAWAY reach the peer
            self._stop_reading()
            return
        except SSL.ZeroReturnError:
            self._dispatch(events)
            self.close(ConnectionLost("peer closed the connection"))
            return
        except (SSL.Error, OSError) as exc:
            self._dispatch(events)
            self.close(ConnectionLost(f"connection error: {_ssl_reason(exc)}"))
            return
        except Exception as exc:  # noqa: BLE001 - whatever a peer makes h2 raise ends only this connection
            log.warning("%s: closing connection after an unexpected HTTP/2 error: %r (GOAWAY INTERNAL_ERROR)",
                        self.name, exc)
            try:
                self.h2.close_connection(error_code=ErrorCodes.INTERNAL_ERROR)
            except Exception:  # noqa: BLE001 - the state machine may be past sending anything
                pass
            self.goaway_sent = True
            self.flush()
            self._stop_reading()
            self.loop.call_later(0.1, self.close, exc)
            return
        self._dispatch(events)
        self.flush()
        if len(self._out) >= OUT_READ_STOP and self.lost is None:
            self._pause_reading()  # the peer is not reading what we owe it: stop reading it too
        elif self.tls.pending() and self.lost is None:
            self.loop.call_soon(self._on_readable)

    def _stop_reading(self) -> None:
        """For good (an error GOAWAY is on its way): unlike a pause, never resumed."""
        self._read_stopped = True
        self.loop.remove_reader(self._fd)

    def _pause_reading(self) -> None:
        if not self._read_paused:
            self._read_paused = True
            self.loop.remove_reader(self._fd)

    def _resume_reading(self) -> None:
        if self._read_paused and self.lost is None and not self._read_stopped:
            self._read_paused = False
            self.loop.add_reader(self._fd, self._on_readable)
            self.loop.call_soon(self._on_readable)  # TLS may hold decrypted bytes already

    def _dispatch(self, events) -> None:
        for event in events:
            kind = type(event)
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if kind is h2.events.DataReceived:
                if stream is not None:
                    stream._on_data(event.data, event.flow_controlled_length)
                else:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is h2.events.WindowUpdated:
                if event.stream_id == 0:
                    for s in self.streams.values():
                        s._writable.set()
                elif stream is not None:
                    stream._writable.set()
            elif kind is h2.events.RequestReceived:
                self._on_request(event)
            elif kind is h2.events.ResponseReceived:
                if stream is not None and not stream.response.done():
                    stream.response.set_result(_decode_headers(event.headers) or [(":status", "0")])
            elif kind is h2.events.StreamEnded:
                if stream is not None:
                    stream._on_end()
            elif kind is h2.events.StreamReset:
                if stream is not None:
                    stream._on_reset(event.error_code)
            elif kind is h2.events.RemoteSettingsChanged:
                for s in self.streams.values():
                    s._writable.set()
            elif kind is h2.events.ConnectionTerminated:
                self._on_goaway(event)
            elif kind is h2.events.PingAckReceived:
                self._ping_outstanding = None
            elif kind is h2.events.TrailersReceived:
                if stream is not None and event.stream_ended is None:
                    pass

    def _on_request(self, event) -> None:
        headers = _decode_headers(event.headers)
        stream = HboneStream(self, event.stream_id, headers or [])
        self.streams[event.stream_id] = stream
        self.streams_opened += 1
        if self.on_request is None or self.goaway_sent:
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return
        if headers is None:
            log.warning("%s: refused CONNECT with 400 Bad Request on stream %d: header block is not valid UTF-8",
                        self.name, event.stream_id)
            stream.respond(400, end=True)
            return
        self._spawn(self.on_request(stream), f"{self.name}-stream-{event.stream_id}")

    def _on_goaway(self, event) -> None:
        self.goaway_received = True
        last = event.last_stream_id or 0
        if event.error_code:
            log.info("%s: peer sent GOAWAY %s: %s", self.name, _code_name(event.error_code), event.additional_data or b"")
        for sid, stream in list(self.streams.items()):
            if self.client and sid > last:
                stream._on_reset(ErrorCodes.REFUSED_STREAM)
        if event.error_code or not self.streams:
            self.close(ConnectionLost(f"peer sent GOAWAY {_code_name(event.error_code)}"))

    def flush(self) -> None:
        if self.lost is not None:
            return
        data = self.h2.data_to_send()
        if data:
            self._out += data
        if self._out and not self._writer_active:
            self._write_some()

    def _write_some(self) -> None:
        try:
            while self._out:
                try:
                    n = self.tls.send(self._out[: 16 * 16384])
                except SSL.WantWriteError:
                    break
                except SSL.WantReadError:
                    break
                del self._out[:n]
        except (SSL.Error, OSError) as exc:
            self.close(ConnectionLost(f"write failed: {self._peer_alert() or _ssl_reason(exc)}"))
            return
        if self._out:
            if not self._writer_active:
                self._writer_active = True
                self.loop.add_writer(self._fd, self._on_writable)
        else:
            if self._writer_active:
                self._writer_active = False
                self.loop.remove_writer(self._fd)
        if len(self._out) < OUT_READ_STOP and self._read_paused:
            self._resume_reading()
        if len(self._out) < HIGH_WATER and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _write_last(self) -> None:
        """Best effort, once, before closing: what h2 still has for the peer (an error GOAWAY)."""
        try:
            self._out += self.h2.data_to_send()
            while self._out:
                del self._out[: self.tls.send(self._out[: 16 * 16384])]
        except (SSL.Error, OSError):
            pass
        self._out.clear()

    def _peer_alert(self) -> str | None:
        """After a failed write, the TLS alert the peer may have sent (e.g. it rejected our
        certificate), which explains the failure better than EPIPE."""
        try:
            self.tls.recv(1)
        except SSL.Error as exc:
            text = str(exc)
            if "alert" in text:
                from ..tls.handshake import describe_ssl_error

                return f"peer rejected the connection: {describe_ssl_error(exc)}"
        except OSError:
            return None
        return None

    def _on_writable(self) -> None:
        self._write_some()
        if self.lost is None:
            data = self.h2.data_to_send()
            if data:
                self._out += data
                self._write_some()

    async def drained(self) -> None:
        if len(self._out) < HIGH_WATER or self.lost is not None:
            if self.lost is not None:
                raise self.lost
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _stream_done(self, stream: HboneStream) -> None:
        self.streams.pop(stream.id, None)
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.goaway_sent or self.goaway_received:
                self.loop.call_soon(self.close)

    async def _keepalive(self) -> None:
        while self.lost is None:
            await asyncio.sleep(PING_INTERVAL)
            if self._ping_outstanding is not None:
                if time.monotonic() - self._ping_outstanding > PING_TIMEOUT:
                    log.warning("%s: no PING ack for %.0fs, dropping connection", self.name, PING_TIMEOUT)
                    self.close(ConnectionLost("keepalive timeout"))
                    return
                continue
            self._ping_outstanding = time.monotonic()
            self.h2.ping(b"ztunnelf")
            self.flush()


def _decode_headers(raw) -> list[tuple[str, str]] | None:
    """h2 hands us bytes; None when any name or value is not UTF-8."""
    try:
        return [(k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
                for k, v in raw]
    except UnicodeDecodeError:
        return None


def _ssl_reason(exc: Exception) -> str:
    if isinstance(exc, SSL.SysCallError) and exc.args:
        return exc.args[-1] if isinstance(exc.args[-1], str) else str(exc.args)
    return str(exc) or type(exc).__name__
