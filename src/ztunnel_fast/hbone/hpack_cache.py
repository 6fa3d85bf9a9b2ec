"""HPACK encoding of the CONNECT exchange's header blocks without re-encoding what repeats.

The native engine encodes every header block with a zero-size dynamic table (stateless: a block a
worker drops can never desynchronise the peer).  With an empty table, each header's
representation depends only on its name and value, so a block is the concatenation of per-header
pieces (plus, in the first block only, the table size update to 0).  `StatelessEncoder` keeps
those pieces:

- headers that repeat (`:method CONNECT`, `:authority` of a destination, the source workload's
  `baggage`, `:status 200`) are encoded once and cached (bounded by CACHE_SIZE);
- headers that differ per connection (VOLATILE: `forwarded` carries the client port,
  `traceparent` a fresh id) reuse a cached name prefix and Huffman-code only the value, with a
  table-driven coder (`huffman`) that joins precomputed bit strings in C instead of shifting a
  Python integer per byte.

Invariant: for every header list, `StatelessEncoder().encode(h)` is byte for byte what
`hpack.Encoder` with `header_table_size = 0` produces (tests/unit/test_hpack_cache.py checks
random and real blocks); anything outside the plain (str, str) case is handed to hpack itself.
"""

from __future__ import annotations

import hpack
from hpack.hpack import encode_integer
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

CACHE_SIZE = 1024  # cached (name, value) pieces per encoder; beyond this the cache starts over
VOLATILE = frozenset({"forwarded", "traceparent"})  # names whose value changes per connection

_BITS = [format(code, f"0{length}b") for code, length in zip(REQUEST_CODES, REQUEST_CODES_LENGTH)]


def huffman(data: bytes) -> bytes:
    """RFC 7541 Huffman code of `data`, padded with the EOS prefix (all ones), as hpack encodes."""
    if not data:
        return b""
    bits = "".join([_BITS[b] for b in data])
    bits += "1" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


class StatelessEncoder:
    """Drop-in for the engine's `hpack.Encoder()` whose `header_table_size` is set to 0."""

    __slots__ = ("_encoder", "_pending", "_pieces", "_prefixes")

    def __init__(self) -> None:
        self._encoder = hpack.Encoder()
        self._encoder.header_table_size = 0
        self._pending = self._encoder.encode([])  # the size update, owed by the first block
        self._pieces: dict[tuple[str, str], bytes] = {}
        self._prefixes: dict[str, bytes] = {}  # VOLATILE name -> its representation up to the value length

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if value != 0:
            raise ValueError("StatelessEncoder keeps a zero-size dynamic table")

    def encode(self, headers) -> bytes:
        if isinstance(headers, dict):
            headers = list(headers.items())
        out = [self._pending] if self._pending else []
        self._pending = b""
        pieces = self._pieces
        for header in headers:
            if type(header) is not tuple or len(header) != 2:  # HeaderTuple, sensitivity flag: hpack decides
                out.append(self._encoder.encode([header]))
                continue
            name, value = header
            if type(name) is not str or type(value) is not str:
                out.append(self._encoder.encode([header]))
                continue
            if name in VOLATILE and value:
                out.append(self._volatile(name, value))
                continue
            piece = pieces.get(header)
            if piece is None:
                if len(pieces) >= CACHE_SIZE:
                    pieces.clear()
                piece = pieces[header] = self._encoder.encode([header])
            out.append(piece)
        return b"".join(out)

    def _volatile(self, name: str, value: str) -> bytes:
        prefix = self._prefixes.get(name)
        if prefix is None:
            # the representation of (name, "x") is prefix + length byte + huffman("x") (1 byte): a
            # non-empty value never fully matches the static table for these names
            sample = self._encoder.encode([(name, "x")])
            prefix = self._prefixes[name] = sample[:-2]
        coded = huffman(value.encode("utf-8"))
        length = encode_integer(len(coded), 7)
        length[0] |= 0x80
        return b"".join((prefix, bytes(length), coded))
