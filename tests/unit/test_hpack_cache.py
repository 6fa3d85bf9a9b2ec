"""hbone/hpack_cache.py: the caching encoder is byte for byte hpack's stateless encoder, block
after block, and its Huffman coder is hpack's."""

from __future__ import annotations

import random

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

from ztunnel_fast.hbone import headers as H
from ztunnel_fast.hbone import hpack_cache
from ztunnel_fast.hbone.hpack_cache import StatelessEncoder, huffman
from ztunnel_fast.state.workload import Workload


def reference() -> hpack.Encoder:
    enc = hpack.Encoder()
    enc.header_table_size = 0
    return enc


def test_huffman_matches_hpack_on_every_byte_and_random_strings():
    ref = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    rng = random.Random(7)
    samples = [b"", bytes(range(256)), b"x", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-00"]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 90))) for _ in range(300)]
    for data in samples:
        assert huffman(data) == ref.encode(data), data


def connect_block(i: int, rng: random.Random) -> list[tuple[str, str]]:
    src = Workload(uid="s", name="sleep-1", namespace="demo", workload_name="sleep", canonical_name="sleep",
                   canonical_revision="v1")
    return H.connect_request(f"10.0.{i % 3}.7:80", client_ip="10.0.0.1", client_port=rng.randrange(1024, 65536),
                             trace_id=H.new_trace_id(), source=src if i % 2 else None,
                             service_host="httpbin.demo.svc.cluster.local" if i % 4 == 1 else None)


def test_connect_blocks_equal_hpack_block_after_block_and_decode_back():
    rng = random.Random(11)
    ours, ref, dec = StatelessEncoder(), reference(), hpack.Decoder()
    for i in range(200):
        block = connect_block(i, rng)
        encoded = ours.encode(block)
        assert encoded == ref.encode(block)
        assert dec.decode(encoded) == block
    for status in ("200", "401", "503"):  # the server side's answers
        assert ours.encode([(":status", status)]) == ref.encode([(":status", status)])


def test_odd_inputs_fall_back_to_hpack_with_the_same_bytes():
    rng = random.Random(3)
    ours, ref = StatelessEncoder(), reference()
    blocks = [
        {":method": "CONNECT", ":authority": "[fd00::2]:80"},
        [(":method", "CONNECT"), ("forwarded", ""), ("traceparent", "")],  # empty volatile values
        [HeaderTuple(":authority", "10.0.0.2:80"), NeverIndexedHeaderTuple("authorization", "secret")],
        [("forwarded", "for=\"[fd00::1]:4242\";host=é.example"), ("x-sensitive", "v", True)],
        [(b":method", b"CONNECT"), ("baggage", "k8s.namespace.name=demo")],
        [("accept-charset", ""), ("user-agent", "".join(chr(rng.randrange(32, 0x2ff)) for _ in range(40)))],
    ]
    for block in blocks:
        assert ours.encode(block) == ref.encode(block), block


def test_the_piece_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(hpack_cache, "CACHE_SIZE", 16)
    ours, ref = StatelessEncoder(), reference()
    for i in range(100):
        block = [(":method", "CONNECT"), (":authority", f"10.0.{i}.1:80")]
        assert ours.encode(block) == ref.encode(block)
        assert len(ours._pieces) <= 16


def test_only_a_zero_table_size_is_accepted():
    enc = StatelessEncoder()
    enc.header_table_size = 0
    with pytest.raises(ValueError):
        enc.header_table_size = 4096
