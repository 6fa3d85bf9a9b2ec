"""The bench's AES-GCM relay (bench/relay_aead.c, setup `relayaead`): built from source, its server
side run on loopback, and spoken to by this test as its client relay would: the 6-byte destination
header in clear, then records (4-byte length, AES-128-GCM ciphertext, 16-byte tag; the length is
the additional data; nonce = direction byte + 64-bit counter).  Proves the relay carries every byte
intact both ways (hash-checked, record boundaries at and around 16 KiB, half-close), that what it
sends towards the peer relay is sealed (opens only with the key and the expected nonce), and that a
forged or malformed record ends the connection instead of reaching the app.

Loopback only; every process and socket is closed by the test, also on failure.  The client side's
SO_ORIGINAL_DST path needs the REDIRECT rule of a pod: the bench's path check covers it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.relay import HEADER, build_aead

RECORD = 16384
WAIT = 20.0  # seconds: bound of every socket wait, never a pass condition


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nonce(direction: int, counter: int) -> bytes:
    return bytes([direction]) + b"\0\0\0" + counter.to_bytes(8, "big")


def _seal(aead: AESGCM, data: bytes, direction: int, first: int = 0) -> bytes:
    out = bytearray()
    for i, off in enumerate(range(0, len(data), RECORD)):
        chunk = data[off:off + RECORD]
        length = struct.pack("!I", len(chunk))
        out += length + aead.encrypt(_nonce(direction, first + i), chunk, length)
    return bytes(out)


def _recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


def _open_all(aead: AESGCM, wire: bytes, direction: int) -> bytes:
    out, off, counter = bytearray(), 0, 0
    while off < len(wire):
        (length,) = struct.unpack_from("!I", wire, off)
        assert 0 < length <= RECORD
        end = off + 4 + length + 16
        assert end <= len(wire), "truncated record"
        out += aead.decrypt(_nonce(direction, counter), wire[off + 4:end], wire[off:off + 4])
        off, counter = end, counter + 1
    return bytes(out)


class App:
    """The destination: hashes what arrives until EOF, then answers digest + `reply` and closes."""

    def __init__(self, reply: bytes):
        self.reply, self.received = reply, bytearray()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(WAIT)
        self.port = self.sock.getsockname()[1]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(WAIT)
                self.received += _recv_all(conn)
                conn.sendall(hashlib.sha256(self.received).digest() + self.reply)
        except OSError as exc:
            self.error = exc

    def close(self) -> None:
        """After the one connection is served (the relay dials the app before it reads any record,
        so it comes; the accept is bounded by WAIT), or the relay's EOF to the test could race it."""
        self.thread.join(WAIT)
        self.sock.close()


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return build_aead(tmp_path_factory.mktemp("relay_aead"))


@pytest.fixture
def relay(binary):
    """The server relay on 127.0.0.1:<port> with a fresh key: (port, AESGCM)."""
    key = os.urandom(16)
    port = _free_port()
    proc = subprocess.Popen([str(binary), "server", "127.0.0.1", str(port), key.hex()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().startswith(b"relay_aead server listening")
        yield port, AESGCM(key)
    finally:
        proc.kill()
        proc.wait(WAIT)
        proc.stdout.close()
        proc.stderr.close()


def _connect(port: int, app: App) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(HEADER.pack(socket.inet_aton("127.0.0.1"), app.port))
    return sock


@pytest.mark.parametrize("size", [1, RECORD - 1, RECORD, RECORD + 1, 256 * 1024 + 5, 8 << 20])
def test_bytes_arrive_intact_both_ways_and_half_close_passes(relay, size):
    port, aead = relay
    data, reply = os.urandom(size), os.urandom(size // 3 + 7)
    app = App(reply)
    try:
        with _connect(port, app) as sock:
            wire = _seal(aead, data, direction=0)
            for off in range(0, len(wire), 1000):  # record boundaries split across segments
                sock.sendall(wire[off:off + 1000])
            sock.shutdown(socket.SHUT_WR)  # the app sees EOF only through the relay's half-close
            back = _open_all(aead, _recv_all(sock), direction=1)
    finally:
        app.close()
    assert app.error is None
    assert bytes(app.received) == data
    assert back == hashlib.sha256(data).digest() + reply


def test_what_goes_to_the_peer_relay_is_sealed(relay):
    port, aead = relay
    reply = b"secret reply " * 100
    app = App(reply)
    try:
        with _connect(port, app) as sock:
            sock.shutdown(socket.SHUT_WR)
            wire = _recv_all(sock)
    finally:
        app.close()
    assert reply not in wire
    assert _open_all(aead, wire, direction=1)[32:] == reply
    with pytest.raises(Exception):  # the other direction's nonces do not open it
        _open_all(aead, wire, direction=0)


@pytest.mark.parametrize("damage", ["flipped ciphertext bit", "wrong key", "zero length", "oversized length"])
def test_a_forged_or_malformed_record_ends_the_connection(relay, damage):
    port, aead = relay
    good = _seal(aead, b"a" * 100, direction=0)
    if damage == "flipped ciphertext bit":
        bad = _seal(aead, b"b" * 100, direction=0, first=1)
        bad = bad[:10] + bytes([bad[10] ^ 1]) + bad[11:]
    elif damage == "wrong key":
        bad = _seal(AESGCM(os.urandom(16)), b"b" * 100, direction=0, first=1)
    elif damage == "zero length":
        bad = struct.pack("!I", 0) + bytes(16)
    else:
        bad = struct.pack("!I", RECORD + 1) + bytes(RECORD + 17)
    app = App(b"never")
    try:
        with _connect(port, app) as sock:
            sock.sendall(good + bad + _seal(aead, b"c" * 100, direction=0, first=2))
            try:
                back = _recv_all(sock)  # the relay shuts the link down: EOF or a reset, no reply
            except ConnectionResetError:
                back = b""
    finally:
        app.close()
    assert back == b""
    assert bytes(app.received) == b"a" * 100, app.error  # the good record arrived, nothing after the bad one
