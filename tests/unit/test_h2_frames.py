"""The native engine's HTTP/2 frame parser, sans-IO (`_splice.FrameParser`): the same C code a
worker runs, fed bytes directly.  Rule by rule (RFC 9113 and the pure twin's limits), then fuzzed
with hypothesis: whatever the bytes, it never crashes and always ends either still parsing frames
or with exactly one GOAWAY carrying an RFC error code.
"""

from __future__ import annotations

import struct

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel_fast import _splice  # noqa: E402 - must be built on this machine kind: a missing build fails, never skips

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EV_HEADERS, EV_STREAM_END, EV_SETTINGS, EV_GOAWAY, EV_ERROR, EV_CLOSED = 2, 3, 4, 5, 6, 7
EV_STREAM_ID = 12
END_REFUSED = 5
DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)
NO_ERROR, PROTOCOL, INTERNAL, FLOW, _, CLOSED, FRAME_SIZE, REFUSED, CANCEL, COMPRESSION, _, CALM = range(12)
MIB = 1 << 20


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"", length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def settings_frame(**values) -> bytes:
    ids = {"header_table_size": 1, "enable_push": 2, "max_concurrent_streams": 3, "initial_window_size": 4,
           "max_frame_size": 5, "max_header_list_size": 6}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", ids[k], v) for k, v in values.items()))


def block(headers) -> bytes:
    return hpack.Encoder().encode(headers)


def connect(sid: int, end_stream=False) -> bytes:
    return frame(HEADERS, 0x4 | (0x1 if end_stream else 0), sid,
                 block([(":method", "CONNECT"), (":authority", "10.0.0.1:80")]))


def server() -> _splice.FrameParser:
    p = _splice.FrameParser(client=False)
    p.feed(PREFACE + settings_frame())
    return p


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, i = [], 0
    while i + 9 <= len(data):
        n = int.from_bytes(data[i:i + 3], "big")
        out.append((data[i + 3], data[i + 4], int.from_bytes(data[i + 5:i + 9], "big") & 0x7FFFFFFF,
                    data[i + 9:i + 9 + n]))
        i += 9 + n
    assert i == len(data), "output ends inside a frame"
    return out


def goaway(p) -> tuple[int, int] | None:
    """(last stream id, error code) of the GOAWAY the parser sent, if any."""
    for ftype, _, _, payload in parse_frames(p.output()):
        if ftype == GOAWAY:
            return struct.unpack(">II", payload[:8])
    return None


def error_code(p) -> int | None:
    codes = [e[4] for e in p.events() if e[0] == EV_ERROR]
    assert len(codes) <= 1
    return codes[0] if codes else None


# ------------------------------------------------------------------------------------ start
def test_server_sends_our_settings_and_raises_the_connection_window():
    p = _splice.FrameParser(client=False)
    frames = parse_frames(p.output())
    assert frames[0][0] == SETTINGS
    values = dict(struct.unpack(">HI", frames[0][3][i:i + 6]) for i in range(0, len(frames[0][3]), 6))
    assert values == {3: 200, 4: 4 * MIB, 5: MIB, 6: 64 * 1024}
    assert frames[1][:3] == (WINDOW, 0, 0) and struct.unpack(">I", frames[1][3])[0] == 16 * MIB - 65535


def test_client_sends_the_preface_first_and_disables_push():
    p = _splice.FrameParser(client=True)
    out = p.output()
    assert out.startswith(PREFACE)
    values = dict(struct.unpack(">HI", parse_frames(out[24:])[0][3][i:i + 6]) for i in range(0, 24, 6))
    assert values[2] == 0 and 3 not in values


def test_settings_and_ping_are_acknowledged_in_the_engine():
    p = _splice.FrameParser(client=False)
    p.output()
    p.feed(PREFACE + settings_frame() + frame(PING, 0, 0, b"12345678"))
    frames = parse_frames(p.output())
    assert (SETTINGS, 1, 0, b"") in frames and (PING, 1, 0, b"12345678") in frames
    assert p.state == "open" and not [e for e in p.events() if e[0] != EV_SETTINGS]


# ------------------------------------------------------------------------------- violations
@pytest.mark.parametrize("data, code", [
    (b"GARBAGE / HTTP/9.9\r\n\r\n", PROTOCOL),                                   # bad preface
    (PREFACE + frame(PING, 0, 0, b"12345678"), PROTOCOL),                       # first frame not SETTINGS
    (PREFACE + settings_frame() + frame(DATA, 0, 1, length=(1 << 24) - 1), FRAME_SIZE),  # header only
    (PREFACE + settings_frame() + connect(2), PROTOCOL),                         # even stream id
    (PREFACE + settings_frame() + connect(5) + connect(3), PROTOCOL),            # lower stream id
    (PREFACE + settings_frame() + frame(DATA, 0, 0, b"x"), PROTOCOL),            # DATA on stream 0
    (PREFACE + settings_frame() + frame(DATA, 0, 9, b"x"), PROTOCOL),            # DATA on an idle stream
    (PREFACE + settings_frame() + frame(PING, 0, 0, b"123"), FRAME_SIZE),
    (PREFACE + settings_frame() + frame(SETTINGS, 0, 0, b"12345"), FRAME_SIZE),
    (PREFACE + settings_frame() + settings_frame(max_frame_size=100), PROTOCOL),
    (PREFACE + settings_frame() + settings_frame(initial_window_size=1 << 31), FLOW),
    (PREFACE + settings_frame() + frame(WINDOW, 0, 0, struct.pack(">I", 0)), PROTOCOL),
    (PREFACE + settings_frame() + frame(WINDOW, 0, 0, struct.pack(">I", 0x7FFFFFFF)), FLOW),  # overflow
    (PREFACE + settings_frame() + connect(1) + frame(WINDOW, 0, 1, struct.pack(">I", 0x7FFFFFFF)), FLOW),
    (PREFACE + settings_frame() + frame(RST, 0, 7, b"\0\0\0\x08"), PROTOCOL),  # RST on an idle stream
    (PREFACE + settings_frame() + frame(CONT, 4, 1, b"x"), PROTOCOL),           # CONTINUATION alone
    (PREFACE + settings_frame() + frame(HEADERS, 0, 1, b"") + frame(PING, 0, 0, b"12345678"), PROTOCOL),
    (PREFACE + settings_frame() + frame(PUSH, 4, 1, b"\0\0\0\x02"), PROTOCOL),
    (PREFACE + settings_frame() + frame(PRIORITY, 0, 1, b"1234"), FRAME_SIZE),
    (PREFACE + settings_frame() + frame(GOAWAY, 0, 1, b"\0" * 8), PROTOCOL),
])
def test_violations_end_the_connection_with_the_right_goaway(data, code):
    p = _splice.FrameParser(client=False)
    p.output()
    p.feed(data)
    assert error_code(p) == code
    assert goaway(p)[1] == code
    assert p.state == "linger"
    p.feed(connect(101))  # nothing is read after the GOAWAY
    assert p.events() == [] and p.output() == b""


def test_goaway_names_the_last_stream_it_processed():
    p = server()
    p.feed(frame(HEADERS, 0x5, 5, block([(":method", "GET"), (":scheme", "https"), (":path", "/"),
                                          (":authority", "a:80")])))
    p.output()
    p.feed(connect(3))
    assert goaway(p) == (5, PROTOCOL)


def test_data_beyond_the_stream_window_is_a_flow_control_error():
    p = server()
    p.feed(settings_frame())
    p.feed(connect(1))
    chunk = frame(DATA, 0, 1, b"x" * MIB)
    for _ in range(4):
        p.feed(chunk)  # 4 MiB: exactly the stream window, held for the tunnel
    assert error_code(p) is None and p.buffered == 4 * MIB
    p.feed(frame(DATA, 0, 1, b"x"))
    assert error_code(p) == FLOW


def test_rapid_reset_is_answered_with_enhance_your_calm():
    p = server()
    for i in range(100):
        p.feed(connect(2 * i + 1) + frame(RST, 0, 2 * i + 1, struct.pack(">I", CANCEL)))
    assert error_code(p) is None
    p.feed(connect(201) + frame(RST, 0, 201, struct.pack(">I", CANCEL)))
    assert error_code(p) == CALM


def test_answered_streams_may_be_reset_freely():
    p = server()
    for i in range(300):
        sid = 2 * i + 1
        p.feed(connect(sid))
        p.respond(sid, block([(":status", "200")]))
        p.feed(frame(RST, 0, sid, struct.pack(">I", CANCEL)))
    assert error_code(p) is None and p.streams == 0


def test_flood_of_empty_data_frames_is_refused():
    p = server()
    p.feed(connect(1))
    p.feed(frame(DATA, 0, 1, b"") * 1000)
    assert error_code(p) is None
    p.feed(frame(DATA, 0, 1, b""))
    assert error_code(p) == CALM


def test_one_byte_data_frames_are_fine():
    p = server()
    p.feed(connect(1))
    p.feed(b"".join(frame(DATA, 0, 1, bytes([i % 256])) for i in range(5000)))
    assert error_code(p) is None and p.buffered == 5000


def test_continuation_flood_is_refused():
    p = server()
    p.feed(frame(HEADERS, 0, 1, b""))
    p.feed(frame(CONT, 0, 1, b"\x00" * 16) * 1100)
    assert error_code(p) == CALM


def test_header_blocks_are_reassembled_and_passed_on_in_order():
    p = server()
    b = block([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x-long", "v" * 3000)])
    p.feed(frame(HEADERS, 0x8, 1, bytes([3]) + b[:1000] + b"pad") + frame(CONT, 0, 1, b[1000:2000])
           + frame(CONT, 0x4, 1, b[2000:]))
    events = [e for e in p.events() if e[0] == EV_HEADERS]
    assert events and events[0][3] == 1
    assert events[0][9] == [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b"x-long", b"v" * 3000)]


def test_header_blocks_are_decoded_with_the_peers_dynamic_table():
    """HPACK context spans blocks (and follows blocks of refused streams): an indexed reference in a
    later block decodes to what an earlier block inserted."""
    p = server()
    enc = hpack.Encoder()
    first = enc.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x-id", "one")])
    second = enc.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x-id", "one")])
    assert len(second) < len(first)  # the second block refers to the dynamic table
    p.feed(frame(HEADERS, 0x4, 1, first) + frame(HEADERS, 0x4, 3, second))
    fields = [e[9] for e in p.events() if e[0] == EV_HEADERS]
    assert fields == [[(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b"x-id", b"one")]] * 2
    assert error_code(p) is None


@pytest.mark.parametrize("bad", [
    b"\xff\xff\xff\xff\xff",                      # an integer that never ends
    b"\xbf",                                       # index 63: beyond the static and (empty) dynamic table
    b"\x3f\xe1\x3f",                               # a table size update above our 4096
    b"\x82\x20",                                   # a table size update after a field
    b"\x40\x85\xff\xff\xff\xff\xff\x01a",              # a Huffman string with an EOS code in it
])
def test_an_undecodable_block_is_a_compression_error_naming_the_last_stream(bad):
    p = server()
    p.feed(frame(HEADERS, 0x4, 1, bad))
    assert goaway(p) == (1, COMPRESSION)
    events = p.events()
    assert not [e for e in events if e[0] == EV_HEADERS]
    assert [e[4] for e in events if e[0] == EV_ERROR] == [COMPRESSION]


def test_a_header_list_beyond_our_limit_is_a_compression_error():
    """SETTINGS_MAX_HEADER_LIST_SIZE counted as hpack counts it: 32 + name + value per field."""
    limit = 200
    settings = list(_splice.DEFAULT_SETTINGS)
    settings[4] = limit
    fields = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
    used = sum(32 + len(k) + len(v) for k, v in fields)
    exact = fields + [("x", "v" * (limit - used - 33))]
    for extra, expected in ((0, None), (1, COMPRESSION)):
        p = _splice.FrameParser(client=False, settings=tuple(settings))
        p.feed(PREFACE + settings_frame())
        p.output()
        p.feed(frame(HEADERS, 0x4, 1, block(exact[:-1] + [("x", exact[-1][1] + "v" * extra)])))
        assert error_code(p) == expected


def test_streams_beyond_max_concurrent_are_refused():
    p = server()
    for i in range(201):
        p.feed(connect(2 * i + 1))
    frames = parse_frames(p.output())
    assert (RST, 0, 401, struct.pack(">I", REFUSED)) in frames and p.streams == 200
    assert error_code(p) is None


def test_a_flood_of_streams_beyond_the_limit_is_refused():
    p = server()
    p.feed(b"".join(connect(2 * i + 1) for i in range(200 + 1000)))
    assert error_code(p) is None
    p.feed(connect(2401))
    assert error_code(p) == CALM


def test_padded_data_is_delivered_without_padding_and_credited():
    p = server()
    p.feed(connect(1))
    p.feed(frame(DATA, 0x8, 1, bytes([10]) + b"hello" + b"\0" * 10))
    assert p.buffered == 5 and error_code(p) is None


def test_client_side_response_and_goaway_refuse_later_streams():
    p = _splice.FrameParser(client=True)
    p.output()
    p.feed(settings_frame(max_concurrent_streams=50))
    p.open_stream(1, block([(":method", "CONNECT"), (":authority", "a:1")]))
    p.open_stream(3, block([(":method", "CONNECT"), (":authority", "a:1")]))
    p.feed(frame(HEADERS, 0x4, 1, block([(":status", "200")])))
    p.feed(frame(GOAWAY, 0, 0, struct.pack(">II", 1, NO_ERROR)))
    events = p.events()
    assert (EV_SETTINGS, 50) in [(e[0], e[7]) for e in events]
    assert [(e[3], e[5]) for e in events if e[0] == EV_HEADERS] == [(1, 8)]  # HF_RESPONSE
    assert [(e[3], e[4]) for e in events if e[0] == EV_STREAM_END] == [(3, REFUSED)]
    assert p.state == "open"


def test_streams_opened_without_an_id_take_the_next_one_in_order():
    """A connection the fast path shares: the event loop sends CMD_OPEN with sid 0 and the worker
    picks the next id, after those it opened itself, and says which (EV_STREAM_ID, the token back)."""
    p = _splice.FrameParser(client=True)
    p.output()
    p.feed(settings_frame())
    p.open_stream(1, block([(":method", "CONNECT"), (":authority", "a:1")]))  # an id chosen by the caller
    p.open_stream(0, block([(":method", "CONNECT"), (":authority", "b:2")]), token=77)
    p.open_stream(0, block([(":method", "CONNECT"), (":authority", "c:3")]), token=78)
    opened = [(e[2], e[3]) for e in p.events() if e[0] == EV_STREAM_ID]
    assert opened == [(77, 3), (78, 5)]
    frames = [f for f in parse_frames(p.output()) if f[0] == HEADERS]
    assert [f[2] for f in frames] == [1, 3, 5]
    assert [dict(hpack.Decoder().decode(f[3]))[":authority"] for f in frames] == ["a:1", "b:2", "c:3"]
    p.feed(frame(HEADERS, 0x4, 5, block([(":status", "200")])))  # the peer answers the picked id
    assert [(e[3], e[5]) for e in p.events() if e[0] == EV_HEADERS] == [(5, 8)]
    p.feed(frame(GOAWAY, 0, 0, struct.pack(">II", 5, NO_ERROR)))
    p.events()
    p.open_stream(0, block([(":method", "CONNECT"), (":authority", "d:4")]), token=79)
    refused = [(e[2], e[3], e[5], e[4]) for e in p.events() if e[0] == EV_STREAM_ID]
    assert refused == [(79, 0, END_REFUSED, REFUSED)]  # after GOAWAY: no id, nothing sent
    assert not [f for f in parse_frames(p.output()) if f[0] == HEADERS]


def test_client_ignores_frames_for_a_stream_it_already_reset():
    p = _splice.FrameParser(client=True)
    p.feed(settings_frame())
    p.open_stream(1, block([(":method", "CONNECT"), (":authority", "a:1")]))
    p.reset(1)
    p.feed(frame(HEADERS, 0x4, 1, block([(":status", "200")])) + frame(DATA, 0, 1, b"late")
           + frame(WINDOW, 0, 1, struct.pack(">I", 10)) + frame(RST, 0, 1, struct.pack(">I", CANCEL)))
    events = p.events()
    assert error_code(p) is None and p.state == "open"
    assert [(e[0], e[5]) for e in events if e[0] == EV_HEADERS] == [(EV_HEADERS, 4)]  # decoded, ignored
    p.feed(frame(HEADERS, 0x4, 3, block([(":status", "200")])))  # never opened: a violation
    assert error_code(p) == PROTOCOL


# ------------------------------------------------------------------------------------ fuzz
def _check_outcome(p) -> None:
    out = p.output()
    frames = parse_frames(out[24:] if out.startswith(PREFACE) else out)
    events = p.events()
    codes = [e[4] for e in events if e[0] == EV_ERROR]
    goaways = [struct.unpack(">II", f[3][:8])[1] for f in frames if f[0] == GOAWAY]
    assert len(codes) <= 1
    if p.state == "linger":
        assert codes and goaways == codes and 0 < codes[0] <= 0xD
    elif p.state == "closed":  # the peer's own error GOAWAY ends the connection, no GOAWAY back
        assert [e[0] for e in events if e[0] in (EV_GOAWAY, EV_CLOSED)] == [EV_GOAWAY, EV_CLOSED]
        assert not codes and not goaways
    else:
        assert not codes and not goaways and p.state in ("preface", "settings", "open")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.booleans())
def test_fuzz_arbitrary_bytes(data, client):
    p = _splice.FrameParser(client=client)
    p.feed(data)
    _check_outcome(p)


_frame = st.builds(
    frame,
    st.integers(0, 12),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 7, 0x7FFFFFFF]),
    st.binary(max_size=64),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frame, max_size=40), st.integers(1, 64), st.booleans())
def test_fuzz_frame_sequences_fed_in_pieces(frames, step, client):
    """Plausible frames (any type, flags, stream id, payload) after a valid start, fed in pieces
    of `step` bytes: the parser's state must not depend on how the bytes were cut."""
    start = settings_frame() if client else PREFACE + settings_frame()
    data = start + b"".join(frames)
    whole = _splice.FrameParser(client=client)
    whole.feed(data)
    pieces = _splice.FrameParser(client=client)
    for i in range(0, len(data), step):
        pieces.feed(data[i:i + step])
    assert whole.state == pieces.state and whole.frames_in == pieces.frames_in
    _check_outcome(pieces)
    _check_outcome(whole)
