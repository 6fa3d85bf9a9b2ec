"""The pure twin's HTTP/2 core (`hbone.connection._H2Connection`, hyper-h2 with our rules) against the
native engine's (`_splice.FrameParser`), sans-IO: the same bytes in, the same frames out.

The e2e suite compares whole engines on the wire (tests/e2e/test_bad_input.py::
test_engines_answer_alike); these cases pin the rules that made them differ before: streams beyond
MAX_CONCURRENT_STREAMS, rapid reset, an undecodable header block, the SETTINGS we advertise.
"""

from __future__ import annotations

import struct

import h2.config
import h2.exceptions
import h2.settings
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import Frame

from ztunnel_fast import _splice
from ztunnel_fast.hbone.connection import H2Settings, _H2Connection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST, SETTINGS, PING, CONTINUATION = 1, 3, 4, 6, 9


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def connect(sid: int) -> bytes:
    return frame(HEADERS, 0x4, sid, hpack.Encoder().encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")]))


def decisions(data: bytes) -> list[tuple]:
    """The frames that carry a decision (no WINDOW_UPDATE pacing), comparable across engines."""
    out, i = [], 0
    while i + 9 <= len(data):
        f, n = Frame.parse_frame_header(memoryview(data[i:i + 9]))
        f.parse_body(memoryview(data[i + 9:i + 9 + n]))
        i += 9 + n
        kind = type(f).__name__
        if kind == "WindowUpdateFrame":
            continue
        detail = (getattr(f, "error_code", None), getattr(f, "last_stream_id", None),
                  tuple(sorted(getattr(f, "settings", {}).items())), getattr(f, "opaque_data", None))
        out.append((kind, f.stream_id, tuple(sorted(f.flags)), detail))
    return out


class Pure:
    """The pure twin's server-side core as HboneConnection configures it."""

    def __init__(self):
        s = H2Settings()
        self.h2 = _H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
        })
        self.h2.initiate_connection()
        self.h2.data_to_send()
        self.error: h2.exceptions.ProtocolError | None = None

    def feed(self, data: bytes) -> None:
        try:
            self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.error = exc

    def output(self) -> bytes:
        return self.h2.data_to_send()


def native() -> _splice.FrameParser:
    p = _splice.FrameParser(client=False)
    p.output()  # our SETTINGS and window: compared by the e2e trace
    return p


def both(*chunks: bytes) -> tuple[list[tuple], list[tuple]]:
    n, p = native(), Pure()
    for chunk in (PREFACE + frame(SETTINGS, 0, 0), *chunks):
        n.feed(chunk)
        p.feed(chunk)
    return decisions(n.output()), decisions(p.output())


def test_a_stream_beyond_the_limit_is_refused_alike_and_the_connection_lives():
    n, p = both(b"".join(connect(2 * i + 1) for i in range(201)), frame(PING, 0, 0, b"afterall"))
    assert n == p
    assert ("RstStreamFrame", 401, (), (ErrorCodes.REFUSED_STREAM, None, (), None)) in p
    assert not [f for f in p if f[0] == "GoAwayFrame"] and p[-1][0] == "PingFrame"


@pytest.mark.parametrize("extra", [1000, 1001])
def test_a_flood_of_refused_streams_ends_alike(extra):
    n, p = both(b"".join(connect(2 * i + 1) for i in range(200 + extra)))
    assert n == p
    goaways = [f for f in p if f[0] == "GoAwayFrame"]
    assert (goaways[0][3][0] == ErrorCodes.ENHANCE_YOUR_CALM) if extra > 1000 else not goaways


def test_rapid_reset_ends_alike_and_nothing_after_it_is_answered():
    burst = b"".join(connect(2 * i + 1) + frame(RST, 0, 2 * i + 1, struct.pack(">I", ErrorCodes.CANCEL))
                     for i in range(101))
    n, p = both(burst + frame(PING, 0, 0, b"too late"))
    assert n == p
    assert p[-1][0] == "GoAwayFrame" and p[-1][3][0] == ErrorCodes.ENHANCE_YOUR_CALM


def test_ping_and_settings_acks_alike():
    n, p = both((frame(PING, 0, 0, b"12345678") + frame(SETTINGS, 0, 0)) * 50)
    assert n == p and len(p) == 101  # the first SETTINGS ack, then 50 pairs


@pytest.mark.parametrize("bad", [
    b"\xff\xff\xff\xff\xff",          # an integer that never ends
    b"\xbf",                           # an index beyond the static and the (empty) dynamic table
    b"\x3f\xe1\x3f",                   # a dynamic table size update above 4096
])
def test_an_undecodable_header_block_is_a_compression_error_alike(bad):
    """Both engines decode HPACK in their own core (native: libnghttp2 in the worker; pure: hpack
    under hyper-h2): the same bad block is the same COMPRESSION_ERROR naming stream 1."""
    n, p = both(frame(HEADERS, 0x4, 1, bad))
    assert n == p
    goaways = [f for f in p if f[0] == "GoAwayFrame"]
    assert goaways == [("GoAwayFrame", 0, (), (ErrorCodes.COMPRESSION_ERROR, 1, (), None))]


def test_a_header_list_beyond_the_limit_ends_alike():
    """One field over SETTINGS_MAX_HEADER_LIST_SIZE (a HEADERS frame and CONTINUATION frames)."""
    big = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80"),
                                  ("x-big", "v" * H2Settings().max_header_list_size)])
    pieces = [big[i:i + 16000] for i in range(0, len(big), 16000)]
    frames = [frame(HEADERS if i == 0 else CONTINUATION, 0x4 if i == len(pieces) - 1 else 0, 1, piece)
              for i, piece in enumerate(pieces)]
    n, p = both(b"".join(frames))
    assert n == p
    assert [f[3][0] for f in p if f[0] == "GoAwayFrame"] == [ErrorCodes.COMPRESSION_ERROR]
