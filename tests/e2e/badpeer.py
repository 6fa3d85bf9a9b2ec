"""A misbehaving HBONE peer, run inside a pod: `python -m tests.e2e.badpeer CASE --ip IP [options]`.

Prints one JSON object on stdout: what the server did (TLS outcome, HTTP/2 frames or events it sent,
whether it closed), and with `--health` a second, well-formed tunnel opened afterwards on a fresh
connection (CONNECT ip:--health-port, payload echoed back, sha256 both ways) to show that the same
server still serves.  Nothing here decides pass or fail: tests/e2e/test_bad_input.py does.

Cases (TLS is stdlib `ssl`, i.e. the system OpenSSL: not the product's, so not its blind spots):
  plaintext | garbage          raw TCP, no TLS
  tls                          handshake only (--tls12, --no-cert, --alpn P), then one read
  request                      valid mTLS + h2 (hyper-h2 client), one stream per --request
  echo                         one good CONNECT tunnel (--authority), payload echoed back
  bad-preface | oversized-frame | oversized-frame-header | even-stream | lower-stream | non-utf8-header
                               valid mTLS, then raw frames built with hyperframe
  flood-reset | flood-ping | flood-data
                               many frames at once, then a PING to see whether the server still serves
  reset-tunnel                 a working tunnel the peer then resets with RST_STREAM(CANCEL)
  too-many-streams             --count CONNECT tunnels at once (one more than the server allows)
  hpack-error                  a HEADERS frame whose block HPACK cannot decode
  bad-record                   valid mTLS + h2, then a TLS record whose ciphertext fails authentication
                               (written on the socket under the TLS layer)
  silent                       TCP only, never a byte: does the server close it (handshake deadline)?
  strangers                    a good mTLS connection first, then --count silent TCP connections, then
                               one more (refused at the cap?), then a tunnel on the good connection
  flood-ping-unread            PINGs written without ever reading the acks, until the server stops
                               reading (the write blocks for --linger s) or --count MiB were written

With --trace, the JSON also holds `trace`: every HTTP/2 frame the server sent on the case's
connection, as comparable descriptions (tests/e2e/test_bad_input.py compares the two engines'
traces): connection frames (stream 0) in order, each stream's frames in order, DATA as bytes per
stream, WINDOW_UPDATE and the server's own keepalive PINGs left out (flow-control pacing and timers
are each engine's business; what they decide is not), and how the connection ended.

Every wait is bounded by --timeout; every socket is closed before the process exits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
READ_SIZE = 65536
PAYLOAD_SIZE = 256 * 1024  # bytes through the health tunnel: several DATA frames and window updates


def _code_name(code: int | None) -> str | None:
    if code is None:
        return None
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


# --------------------------------------------------------------------------------------------- TLS
def tls_connect(args, *, tls12: bool = False, cert: bool = True, alpn: list[str] | None = None) -> ssl.SSLSocket:
    """mTLS like an HBONE client: TLS 1.3 (or 1.2 only), ALPN h2, no SNI, server verified by --root."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE: URI SANs only; identity is not what these cases test
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(args.root)
    if tls12:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(alpn if alpn is not None else ["h2"])
    if cert and args.cert_dir:
        ctx.load_cert_chain(os.path.join(args.cert_dir, "cert.pem"), os.path.join(args.cert_dir, "key.pem"))
    raw = socket.create_connection((args.ip, args.port), timeout=args.timeout)
    try:
        sock = ctx.wrap_socket(raw, server_hostname=None)  # None: no SNI, as ztunnel
    except BaseException:
        raw.close()
        raise
    Trace.watch(sock)
    return sock


class Trace:
    """The bytes the server sent on the traced connection (the case's first TLS connection)."""

    enabled = False
    sock = None
    received = bytearray()
    ended: str | None = None

    @classmethod
    def watch(cls, sock) -> None:
        if cls.enabled and cls.sock is None:
            cls.sock = sock

    @classmethod
    def record(cls, sock, data: bytes | None = None, error: BaseException | None = None) -> None:
        if sock is not cls.sock or cls.ended is not None:
            return
        if error is not None:
            cls.ended = "error" if not isinstance(error, ssl.SSLEOFError) else "eof without close_notify"
        elif data == b"":
            cls.ended = "close_notify"
        elif data:
            cls.received += data

    @classmethod
    def describe(cls) -> dict:
        """Comparable descriptions of the server's frames (see the module docstring)."""
        decoder = hpack.Decoder()
        connection: list = []
        streams: dict[str, list] = {}
        data_bytes: dict[str, int] = {}
        buf = bytes(cls.received)
        i = 0
        while i + 9 <= len(buf):
            frame, length = Frame.parse_frame_header(memoryview(buf[i:i + 9]))
            if i + 9 + length > len(buf):
                break
            frame.parse_body(memoryview(buf[i + 9:i + 9 + length]))
            i += 9 + length
            flags = sorted(frame.flags)
            sid = str(frame.stream_id)
            if isinstance(frame, DataFrame):
                data_bytes[sid] = data_bytes.get(sid, 0) + len(frame.data)
                if "END_STREAM" in flags:
                    streams.setdefault(sid, []).append(["END_STREAM"])
                continue
            if isinstance(frame, WindowUpdateFrame):
                continue
            if isinstance(frame, PingFrame) and "ACK" not in flags:
                continue  # the server's keepalive: a timer, not an answer
            d: list = [type(frame).__name__.replace("Frame", "").upper(), flags]
            if isinstance(frame, HeadersFrame):
                try:
                    d.append(sorted((k.decode(), v.decode()) for k, v in decoder.decode(frame.data, raw=True)))
                except Exception as exc:  # noqa: BLE001 - recorded: a difference to show, not a crash
                    d.append(f"undecodable: {exc}")
            elif isinstance(frame, GoAwayFrame):
                d += [_code_name(frame.error_code), frame.last_stream_id]
            elif isinstance(frame, RstStreamFrame):
                d.append(_code_name(frame.error_code))
            elif isinstance(frame, SettingsFrame):
                d.append(sorted((_setting_name(k), v) for k, v in frame.settings.items()))
            elif isinstance(frame, PingFrame):
                d.append(frame.opaque_data.hex() if frame.opaque_data == b"badpeer!" else "n")
            (connection if frame.stream_id == 0 else streams.setdefault(sid, [])).append(d)
        return {"connection": _run_length(connection), "streams": {k: _run_length(v) for k, v in streams.items()},
                "data_bytes": data_bytes, "ended": cls.ended}


def _run_length(items: list) -> list:
    """[[item, count], ...] for runs of equal items (floods answer thousands of equal frames)."""
    out: list = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1][1] += 1
        else:
            out.append([item, 1])
    return out


def _recv(sock, deadline: float) -> bytes | None:
    """Up to READ_SIZE bytes; b"" at EOF; None when the deadline passed first."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    sock.settimeout(remaining)
    try:
        data = sock.recv(READ_SIZE)
    except (socket.timeout, TimeoutError):
        return None
    except (OSError, ssl.SSLError) as exc:
        Trace.record(sock, error=exc)
        raise
    Trace.record(sock, data)
    return data


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------ raw frames
def _frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return struct.pack(">I", length)[1:] + bytes([ftype, flags]) + struct.pack(">I", stream_id & 0x7FFFFFFF)


def _headers(stream_id: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False) -> bytes:
    f = HeadersFrame(stream_id)
    f.data = hpack.Encoder().encode(headers)
    f.flags.add("END_HEADERS")
    if end_stream:
        f.flags.add("END_STREAM")
    return f.serialize()


def _setting_name(code: int) -> str:
    try:
        return h2.settings.SettingCodes(code).name
    except ValueError:
        return str(code)


def _describe(frame: Frame) -> dict:
    d = {"type": type(frame).__name__.replace("Frame", "").upper(), "stream": frame.stream_id,
         "flags": sorted(frame.flags)}
    if isinstance(frame, GoAwayFrame):
        d.update(error=_code_name(frame.error_code), last_stream_id=frame.last_stream_id,
                 debug=frame.additional_data.decode("utf-8", "replace"))
    elif isinstance(frame, RstStreamFrame):
        d.update(error=_code_name(frame.error_code))
    elif isinstance(frame, SettingsFrame):
        d.update(settings={_setting_name(k): v for k, v in frame.settings.items()})
    return d


class FrameReader:
    """Frames the server sends, parsed with hyperframe; stops at GOAWAY, EOF, error or deadline."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.frames: list[Frame] = []
        self.closed: str | None = None  # "eof" | "error: ..." once the connection ended

    def read_until(self, done, timeout: float) -> bool:
        """Read until done(self) is true (returns True), or EOF/error/deadline (returns done(self))."""
        deadline = time.monotonic() + timeout
        while not done(self) and self.closed is None:
            try:
                data = _recv(self.sock, deadline)
            except (OSError, ssl.SSLError) as exc:
                self.closed = "error: " + _err(exc)
                break
            if data is None:
                break
            if not data:
                self.closed = "eof"
                break
            self.buf += data
            self._parse()
        return done(self)

    def _parse(self) -> None:
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                return
            frame.parse_body(memoryview(self.buf[9:9 + length]))
            del self.buf[:9 + length]
            self.frames.append(frame)

    def goaway(self) -> GoAwayFrame | None:
        return next((f for f in self.frames if isinstance(f, GoAwayFrame)), None)

    def server_settings(self) -> SettingsFrame | None:
        return next((f for f in self.frames if isinstance(f, SettingsFrame) and "ACK" not in f.flags), None)

    def report(self) -> dict:
        goaway = self.goaway()
        return {
            "frames": [_describe(f) for f in self.frames][-20:],
            "frame_count": len(self.frames),
            "goaway": _code_name(goaway.error_code) if goaway else None,
            "closed": self.closed,
        }


def _raw_session(args):
    """mTLS, client preface + empty SETTINGS, the server's SETTINGS acknowledged (so its advertised
    limits, e.g. MAX_FRAME_SIZE, are in force on the server side from here on)."""
    sock = tls_connect(args)
    reader = FrameReader(sock)
    sock.sendall(PREFACE + SettingsFrame(0).serialize())
    if not reader.read_until(lambda r: r.server_settings() is not None, args.timeout):
        raise RuntimeError(f"no SETTINGS from server: {reader.report()}")
    ack = SettingsFrame(0)
    ack.flags.add("ACK")
    sock.sendall(ack.serialize())
    return sock, reader


def _wait_goaway_and_close(reader: FrameReader, timeout: float) -> dict:
    reader.read_until(lambda r: r.goaway() is not None, timeout)
    if reader.goaway() is not None:  # then the server should also close: wait for EOF (bounded)
        reader.read_until(lambda r: False, timeout)
    return reader.report()


def _connect_headers(args, authority: str | None = None) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"CONNECT"), (b":authority", (authority or f"{args.ip}:{args.health_port}").encode())]


# ------------------------------------------------------------------------------------ h2 client
def _h2_client(sock) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8",
        validate_outbound_headers=False, normalize_outbound_headers=False,  # we send bad ones on purpose
    ))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return conn


def h2_requests(sock, requests: list[list[tuple[str, str]]], timeout: float):
    """Send each header list on its own stream (END_STREAM unless CONNECT); collect every stream's
    outcome: {"status": "400"} or {"reset": "CANCEL"}; plus GOAWAY and close."""
    conn = _h2_client(sock)
    outcome: dict[int, dict] = {}
    for headers in requests:
        sid = conn.get_next_available_stream_id()
        method = dict(headers).get(":method")
        conn.send_headers(sid, headers, end_stream=method != "CONNECT")
        outcome[sid] = {}
    sock.sendall(conn.data_to_send())
    goaway, closed = None, None
    deadline = time.monotonic() + timeout
    while any(not o for o in outcome.values()) and goaway is None and closed is None:
        try:
            data = _recv(sock, deadline)
        except (OSError, ssl.SSLError) as exc:
            closed = "error: " + _err(exc)
            break
        if data is None:
            break
        if not data:
            closed = "eof"
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                outcome[ev.stream_id].update(status=dict(ev.headers).get(":status"),
                                             end_stream=ev.stream_ended is not None)
                if ev.stream_ended is None:  # a tunnel we did not want: close it
                    conn.reset_stream(ev.stream_id, ErrorCodes.CANCEL)
            elif isinstance(ev, h2.events.StreamReset):
                outcome.setdefault(ev.stream_id, {}).setdefault("reset", _code_name(ev.error_code))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                goaway = _code_name(ev.error_code)
        sock.sendall(conn.data_to_send())
    return {"streams": [outcome[sid] for sid in sorted(outcome)], "goaway": goaway, "closed": closed}, conn


def h2_echo(sock, authority: str, size: int, timeout: float, conn=None) -> dict:
    """One CONNECT tunnel: send `size` bytes, half-close, read the echo to END_STREAM, compare."""
    conn = conn or _h2_client(sock)
    payload = hashlib.sha256(os.urandom(32)).digest() * (size // 32 + 1)
    payload = payload[:size]
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
    sock.sendall(conn.data_to_send())
    out = {"status": None, "sent": 0, "received": 0, "ended": False, "reset": None, "goaway": None, "error": None}
    got = hashlib.sha256()
    deadline = time.monotonic() + timeout
    offset = 0
    while not out["ended"] and out["reset"] is None and out["goaway"] is None:
        if out["status"] == "200" and offset < len(payload):  # send what the windows allow
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window > 0:
                chunk = payload[offset:offset + window]
                offset += len(chunk)
                conn.send_data(sid, chunk, end_stream=offset >= len(payload))
                sock.sendall(conn.data_to_send())
                continue
        try:
            data = _recv(sock, deadline)
        except (OSError, ssl.SSLError) as exc:
            out["error"] = _err(exc)
            break
        if data is None:
            out["error"] = "timeout"
            break
        if not data:
            out["error"] = "eof"
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                out["status"] = dict(ev.headers).get(":status")
                if out["status"] != "200":
                    out["ended"] = True
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                got.update(ev.data)
                out["received"] += len(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                out["ended"] = True
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                out["reset"] = _code_name(ev.error_code)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                out["goaway"] = _code_name(ev.error_code)
        sock.sendall(conn.data_to_send())
    out["sent"] = offset
    out["ok"] = (out["status"] == "200" and out["ended"] and offset == size
                 and got.hexdigest() == hashlib.sha256(payload).hexdigest())
    return out


# ----------------------------------------------------------------------------------------- cases
def case_plaintext(args) -> dict:
    return _raw_tcp(args, f"GET / HTTP/1.1\r\nHost: {args.ip}:{args.port}\r\nUser-Agent: badpeer\r\n\r\n".encode())


def case_garbage(args) -> dict:
    # Deterministic, and 0xde is no TLS record type: the server cannot mistake it for a partial record.
    return _raw_tcp(args, b"\xde\xad\xbe\xef" * 1024)


def _raw_tcp(args, data: bytes) -> dict:
    sock = socket.create_connection((args.ip, args.port), timeout=args.timeout)
    received = bytearray()
    closed = None
    try:
        try:
            sock.sendall(data)
        except OSError as exc:
            closed = "error: " + _err(exc)
        deadline = time.monotonic() + args.timeout
        while closed is None:
            try:
                chunk = _recv(sock, deadline)
            except OSError as exc:
                closed = "error: " + _err(exc)
                break
            if chunk is None:
                break
            if not chunk:
                closed = "eof"
                break
            received += chunk
    finally:
        sock.close()
    return {"closed": closed, "received": len(received), "head": received[:16].hex()}


def case_tls(args) -> dict:
    out = {"handshake": None, "version": None, "alpn": None, "after": None, "frames": []}
    try:
        sock = tls_connect(args, tls12=args.tls12, cert=not args.no_cert,
                           alpn=[p for p in args.alpn.split(",") if p] if args.alpn is not None else None)
    except (OSError, ssl.SSLError) as exc:
        out["handshake"] = "error: " + _err(exc)
        return out
    out.update(handshake="ok", version=sock.version(), alpn=sock.selected_alpn_protocol())
    try:
        # A TLS 1.3 server decides on the client certificate after the client's handshake is done:
        # its verdict (an alert, or its HTTP/2 SETTINGS) comes with the first read.
        sock.sendall(PREFACE + SettingsFrame(0).serialize())
        reader = FrameReader(sock)
        reader.read_until(lambda r: r.server_settings() is not None and (not args.trace or any(
            isinstance(f, SettingsFrame) and "ACK" in f.flags for f in r.frames)), args.timeout)
        out["frames"] = reader.report()["frames"]
        out["after"] = reader.closed or ("settings" if reader.server_settings() else "timeout")
    except (OSError, ssl.SSLError) as exc:
        out["after"] = "error: " + _err(exc)
    finally:
        sock.close()
    return out


def case_request(args) -> dict:
    requests = [json.loads(r) for r in args.request]
    sock = tls_connect(args)
    try:
        out, conn = h2_requests(sock, [[tuple(p) for p in r] for r in requests], args.timeout)
        if args.then_echo and out["goaway"] is None and out["closed"] is None:
            # the same connection must still carry a good tunnel after the refusals
            out["echo_same_connection"] = h2_echo(sock, f"{args.ip}:{args.health_port}", 4096, args.timeout,
                                                  conn=conn)
        return out
    finally:
        sock.close()


def case_echo(args) -> dict:
    sock = tls_connect(args)
    try:
        return h2_echo(sock, args.authority or f"{args.ip}:{args.health_port}", args.size, args.timeout)
    finally:
        sock.close()


def case_bad_preface(args) -> dict:
    sock = tls_connect(args)
    try:
        sock.sendall(b"GARBAGE / HTTP/9.9\r\n\r\nNOT AN HTTP/2 PREFACE")
        return _wait_goaway_and_close(FrameReader(sock), args.timeout)
    finally:
        sock.close()


def case_oversized_frame(args) -> dict:
    """A complete HEADERS frame one byte over the server's MAX_FRAME_SIZE."""
    sock, reader = _raw_session(args)
    try:
        limit = reader.server_settings().settings.get(h2.settings.SettingCodes.MAX_FRAME_SIZE, 16384)
        block = hpack.Encoder().encode(_connect_headers(args))
        body = block + b"\x00" * (limit + 1 - len(block))  # padding bytes after the block: size is the point
        try:
            sock.sendall(_frame_header(len(body), 0x1, 0x4, 1) + body)
        except (ssl.SSLError, OSError):
            pass  # a server that refuses from the header may close before the body is all sent
        return {"server_max_frame_size": limit, **_wait_goaway_and_close(reader, args.timeout)}
    finally:
        sock.close()


def case_oversized_frame_header(args) -> dict:
    """Only the 9-byte header of a DATA frame announcing 16 MiB - 1 (far above MAX_FRAME_SIZE): an
    HTTP/2 server can and must (RFC 9113 4.2) reject it from the header, without buffering 16 MiB."""
    sock, reader = _raw_session(args)
    try:
        limit = reader.server_settings().settings.get(h2.settings.SettingCodes.MAX_FRAME_SIZE, 16384)
        sock.sendall(_frame_header((1 << 24) - 1, 0x0, 0x0, 1))
        return {"server_max_frame_size": limit, **_wait_goaway_and_close(reader, args.timeout)}
    finally:
        sock.close()


def case_even_stream(args) -> dict:
    sock, reader = _raw_session(args)
    try:
        sock.sendall(_headers(2, _connect_headers(args)))
        return _wait_goaway_and_close(reader, args.timeout)
    finally:
        sock.close()


def case_lower_stream(args) -> dict:
    """Stream 5 (a GET, answered 400 and closed), then a new stream 3: lower than one already used."""
    sock, reader = _raw_session(args)
    try:
        get = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
               (b":authority", f"{args.ip}:{args.health_port}".encode())]
        sock.sendall(_headers(5, get, end_stream=True))
        reader.read_until(lambda r: any(isinstance(f, HeadersFrame) and f.stream_id == 5 for f in r.frames),
                          args.timeout)
        sock.sendall(_headers(3, _connect_headers(args)))
        return _wait_goaway_and_close(reader, args.timeout)
    finally:
        sock.close()


def case_non_utf8_header(args) -> dict:
    """A CONNECT whose :authority holds a byte that is not UTF-8 (HTTP/2 field values are octets)."""
    sock, reader = _raw_session(args)
    try:
        sock.sendall(_headers(1, [(b":method", b"CONNECT"), (b":authority", f"{args.ip}:\xff80".encode("latin-1"))]))
        answered = reader.read_until(
            lambda r: r.goaway() is not None or any(
                isinstance(f, (HeadersFrame, RstStreamFrame)) and f.stream_id == 1 for f in r.frames),
            args.timeout)
        out = reader.report()
        out["answered"] = answered
        return out
    finally:
        sock.close()


def _ping_roundtrip(sock, reader: FrameReader, timeout: float) -> bool:
    """True when the server still answers a PING (after whatever came before)."""
    probe = PingFrame(0)
    probe.opaque_data = b"badpeer!"
    sock.sendall(probe.serialize())
    return reader.read_until(lambda r: any(
        isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == b"badpeer!" for f in r.frames), timeout)


def case_flood_reset(args) -> dict:
    """Rapid reset: HEADERS (a valid CONNECT) + RST_STREAM(CANCEL) on --count streams, in one burst."""
    sock, reader = _raw_session(args)
    try:
        enc = hpack.Encoder()
        burst = bytearray()
        for i in range(args.count):
            sid = 2 * i + 1
            f = HeadersFrame(sid)
            f.data = enc.encode(_connect_headers(args))
            f.flags.add("END_HEADERS")
            burst += f.serialize() + RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize()
        try:
            sock.sendall(burst)
            alive = _ping_roundtrip(sock, reader, args.timeout)
            # stay connected while the server works through the burst: what it does with streams
            # the peer already cancelled (late HEADERS, RST_STREAM, GOAWAY) shows here
            reader.read_until(lambda r: False, args.linger)
        except (OSError, ssl.SSLError) as exc:
            reader.closed, alive = "error: " + _err(exc), False
        out = reader.report()
        kinds = {}
        for f in reader.frames:
            kinds[type(f).__name__] = kinds.get(type(f).__name__, 0) + 1
        out.update(frame_kinds=kinds)
        out.update(sent_streams=args.count, ping_after=alive, frames=out["frames"][-5:])
        return out
    finally:
        sock.close()


def case_flood_ping(args) -> dict:
    """--count PINGs and --count empty SETTINGS in one burst, written before reading anything."""
    sock, reader = _raw_session(args)
    try:
        burst = bytearray()
        for i in range(args.count):
            burst += PingFrame(0, opaque_data=struct.pack(">Q", i)).serialize() + SettingsFrame(0).serialize()
        try:
            sock.sendall(burst)
            alive = _ping_roundtrip(sock, reader, args.timeout)
        except (OSError, ssl.SSLError) as exc:
            reader.closed, alive = "error: " + _err(exc), False
        out = reader.report()
        acks = sum(1 for f in reader.frames if isinstance(f, PingFrame) and "ACK" in f.flags)
        out.update(sent_pings=args.count, ping_acks=acks, ping_after=alive, frames=out["frames"][-5:])
        return out
    finally:
        sock.close()


def case_flood_data(args) -> dict:
    """One tunnel whose payload arrives as --count DATA frames of 1 byte each; the echo must match."""
    sock, reader = _raw_session(args)
    try:
        payload = (hashlib.sha256(b"flood").digest() * (args.count // 32 + 1))[:args.count]
        sock.sendall(_headers(1, _connect_headers(args)))
        if not reader.read_until(lambda r: any(isinstance(f, HeadersFrame) and f.stream_id == 1 for f in r.frames),
                                 args.timeout):
            return {"status": None, **reader.report()}
        hdr = next(f for f in reader.frames if isinstance(f, HeadersFrame) and f.stream_id == 1)
        status = dict(hpack.Decoder().decode(hdr.data)).get(":status")
        burst = bytearray()
        for i in range(args.count):  # within the 64 KiB initial connection window for count <= 65535
            burst += DataFrame(1, payload[i:i + 1], flags=["END_STREAM"] if i == args.count - 1 else []).serialize()
        sock.sendall(burst)
        ended = reader.read_until(lambda r: any(
            isinstance(f, (DataFrame, RstStreamFrame, GoAwayFrame)) and f.stream_id in (0, 1)
            and ("END_STREAM" in f.flags or not isinstance(f, DataFrame)) for f in r.frames), args.timeout)
        echoed = b"".join(f.data for f in reader.frames if isinstance(f, DataFrame) and f.stream_id == 1)
        out = reader.report()
        out.update(status=status, ended=ended, received=len(echoed),
                   ok=status == "200" and echoed == payload, frames=out["frames"][-5:])
        return out
    finally:
        sock.close()


def case_reset_tunnel(args) -> dict:
    """A tunnel that works (200, bytes echoed), then the peer resets it: what every client ztunnel
    does when its downstream connection is reset.  Then a PING, to see the connection still serves."""
    sock, reader = _raw_session(args)
    try:
        sock.sendall(_headers(1, _connect_headers(args)))
        sock.sendall(DataFrame(1, b"ping-through-tunnel").serialize())
        echoed = reader.read_until(lambda r: b"".join(
            f.data for f in r.frames if isinstance(f, DataFrame) and f.stream_id == 1) == b"ping-through-tunnel",
            args.timeout)
        sock.sendall(RstStreamFrame(1, error_code=ErrorCodes.CANCEL).serialize())
        alive = _ping_roundtrip(sock, reader, args.timeout)
        out = reader.report()
        out.update(echoed=echoed, ping_after=alive)
        return out
    finally:
        sock.close()


def case_too_many_streams(args) -> dict:
    """--count CONNECT tunnels opened at once (the server advertises MAX_CONCURRENT_STREAMS one
    less): RFC 9113 5.1.2 wants the excess refused (RST_STREAM REFUSED_STREAM), the rest served."""
    sock, reader = _raw_session(args)
    try:
        enc = hpack.Encoder()
        burst = bytearray()
        for i in range(args.count):
            f = HeadersFrame(2 * i + 1)
            f.data = enc.encode(_connect_headers(args))
            f.flags.add("END_HEADERS")
            burst += f.serialize()
        sock.sendall(burst)

        def answered(r: FrameReader) -> bool:
            done = {f.stream_id for f in r.frames if isinstance(f, (HeadersFrame, RstStreamFrame))}
            return len(done) >= args.count or r.goaway() is not None

        complete = reader.read_until(answered, args.timeout)
        alive = reader.goaway() is None and _ping_roundtrip(sock, reader, args.timeout)
        out = reader.report()
        statuses: dict[str, int] = {}
        decoder = hpack.Decoder()
        for f in reader.frames:
            if isinstance(f, HeadersFrame):
                status = dict(decoder.decode(f.data)).get(":status")
                statuses[status] = statuses.get(status, 0) + 1
        refused = sorted(f.stream_id for f in reader.frames
                         if isinstance(f, RstStreamFrame) and f.error_code == ErrorCodes.REFUSED_STREAM)
        out.update(sent_streams=args.count, complete=complete, statuses=statuses, refused=refused,
                   ping_after=alive, frames=out["frames"][-5:])
        return out
    finally:
        sock.close()


def case_hpack_error(args) -> dict:
    """HEADERS on stream 1 whose block is an HPACK integer that never ends: undecodable."""
    sock, reader = _raw_session(args)
    try:
        sock.sendall(_frame_header(5, 0x1, 0x4, 1) + b"\xff\xff\xff\xff\xff")
        return _wait_goaway_and_close(reader, args.timeout)
    finally:
        sock.close()


def case_bad_record(args) -> dict:
    sock, _reader = _raw_session(args)
    try:
        # an application_data record (TLS 1.3 outer type 23, version 3.3) of random bytes: the
        # server's record layer cannot authenticate it (bad_record_mac)
        os.write(sock.fileno(), b"\x17\x03\x03" + struct.pack("!H", 64) + os.urandom(64))
        return {"closed": _wait_closed(sock, args.timeout)}
    finally:
        sock.close()


def case_flood_ping_unread(args) -> dict:
    """PINGs written and never read, until a write blocks for --linger s (the server stopped reading)
    or --count MiB went out; then whatever the server still sends is read up to GOAWAY/close."""
    sock, reader = _raw_session(args)
    try:
        chunk = b"".join(PingFrame(0, opaque_data=struct.pack(">Q", i)).serialize() for i in range(4096))
        limit = args.count << 20
        written, blocked, error = 0, False, None
        sock.settimeout(args.linger)
        while written < limit:
            try:
                written += sock.send(chunk)
            except (socket.timeout, TimeoutError):
                blocked = True  # the server stopped reading us: backpressure
                break
            except (OSError, ssl.SSLError) as exc:
                error = _err(exc)  # e.g. closed after GOAWAY ENHANCE_YOUR_CALM
                break
        out = {"written": written, "limit": limit, "blocked": blocked, "write_error": error}
        # stop flooding and read: what the server does now (its acks, a GOAWAY) is reported
        reader.read_until(lambda r: r.goaway() is not None, args.linger)
        out.update(goaway=reader.report()["goaway"])
        return out
    finally:
        sock.close()


def _wait_closed(sock, timeout: float) -> str | None:
    """How the server ended a connection we never wrote to: "eof", "error: ..." or None (still open)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = _recv(sock, deadline)
        except OSError as exc:
            return "error: " + _err(exc)
        if data is None:
            return None
        if not data:
            return "eof"


def case_silent(args) -> dict:
    sock = socket.create_connection((args.ip, args.port), timeout=args.timeout)
    try:
        return {"closed": _wait_closed(sock, args.timeout)}
    finally:
        sock.close()


def case_strangers(args) -> dict:
    phase = "good connection"
    idle: list[socket.socket] = []
    good = None
    try:
        good = tls_connect(args)
        conn = _h2_client(good)
        # a first tunnel: from here on the server has verified us (TLS 1.3 clients finish first)
        before = h2_echo(good, f"{args.ip}:{args.health_port}", 4096, args.timeout, conn=conn)
        phase = "strangers"
        for _ in range(args.count):
            idle.append(socket.create_connection((args.ip, args.port), timeout=args.timeout))
        phase = "one stranger more"
        try:
            extra = socket.create_connection((args.ip, args.port), timeout=args.timeout)
        except ConnectionResetError as exc:  # reset so fast that connect() itself saw it
            extra_closed = "error: " + _err(exc)
        else:
            try:
                extra_closed = _wait_closed(extra, args.timeout)
            finally:
                extra.close()
        # the idle ones are still open (pending, not refused): none of them was closed by the server
        still_open = sum(1 for s in idle if _wait_closed(s, 0.01) is None)
        phase = "tunnel during the cap"
        echo = h2_echo(good, f"{args.ip}:{args.health_port}", PAYLOAD_SIZE, args.timeout, conn=conn)
        return {"echo_before": before, "extra_closed": extra_closed, "idle_open": still_open,
                "echo_during_cap": echo}
    except (OSError, ssl.SSLError) as exc:
        return {"failed_in": phase, "error": _err(exc)}
    finally:
        for s in idle:
            s.close()
        if good is not None:
            good.close()


CASES = {
    "plaintext": case_plaintext,
    "garbage": case_garbage,
    "tls": case_tls,
    "request": case_request,
    "echo": case_echo,
    "bad-preface": case_bad_preface,
    "oversized-frame": case_oversized_frame,
    "oversized-frame-header": case_oversized_frame_header,
    "even-stream": case_even_stream,
    "lower-stream": case_lower_stream,
    "non-utf8-header": case_non_utf8_header,
    "flood-reset": case_flood_reset,
    "flood-ping": case_flood_ping,
    "flood-data": case_flood_data,
    "reset-tunnel": case_reset_tunnel,
    "too-many-streams": case_too_many_streams,
    "hpack-error": case_hpack_error,
    "bad-record": case_bad_record,
    "flood-ping-unread": case_flood_ping_unread,
    "silent": case_silent,
    "strangers": case_strangers,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.e2e.badpeer", description=__doc__.splitlines()[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--ip", required=True, help="server pod IP")
    p.add_argument("--port", type=int, default=15008)
    p.add_argument("--root", help="trust root (PEM) that verifies the server")
    p.add_argument("--cert-dir", help="client identity: cert.pem + key.pem")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for each wait")
    p.add_argument("--tls12", action="store_true", help="tls: TLS 1.2 only")
    p.add_argument("--no-cert", action="store_true", help="tls: present no client certificate")
    p.add_argument("--alpn", help="tls: comma-separated ALPN list ('' = none) instead of h2")
    p.add_argument("--request", action="append", default=[], help="request: JSON [[name, value], ...]")
    p.add_argument("--then-echo", action="store_true", help="request: then a good tunnel on the same connection")
    p.add_argument("--authority", help="echo: CONNECT authority (default ip:--health-port)")
    p.add_argument("--size", type=int, default=PAYLOAD_SIZE, help="echo: payload bytes")
    p.add_argument("--count", type=int, default=1000, help="flood-*: frames/streams")
    p.add_argument("--linger", type=float, default=2.0, help="flood-reset: seconds to stay connected after")
    p.add_argument("--health", action="store_true", help="afterwards, a good tunnel on a fresh connection")
    p.add_argument("--trace", action="store_true", help="report every frame the server sent (`trace`)")
    p.add_argument("--health-cert-dir", help="--health: client identity (default --cert-dir)")
    p.add_argument("--health-port", type=int, default=80, help="the echo app's port")
    args = p.parse_args(argv)

    Trace.enabled = args.trace
    try:
        out = CASES[args.case](args)
    except Exception as exc:  # noqa: BLE001 - reported, the test decides
        out = {"exception": _err(exc)}
    out["case"] = args.case
    if args.trace:
        out["trace"] = Trace.describe()
    Trace.enabled = False
    if args.health:
        try:
            args.cert_dir = args.health_cert_dir or args.cert_dir
            sock = tls_connect(args)
            try:
                out["health"] = h2_echo(sock, f"{args.ip}:{args.health_port}", PAYLOAD_SIZE, args.timeout)
            finally:
                sock.close()
        except Exception as exc:  # noqa: BLE001
            out["health"] = {"ok": False, "error": _err(exc)}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
