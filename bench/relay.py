"""A plain TCP relay pair placed where the proxies sit: the bench's `relay` (splice) and
`relaycopy` setups, the CPU floor of any proxy pair on this machine and topology.

  pod client: app ──tcp <server>:<port>──▶ iptables REDIRECT ──▶ relay client 0.0.0.0:15001
              (SO_ORIGINAL_DST restores <server>:<port>; sends it as a 6-byte header)
              ──tcp, SO_MARK 1337──▶ pod server: relay server <server>:15008 ──tcp──▶ app

No TLS, no HTTP/2: what is left is what every proxy pair pays whatever it is written in — the
accept, the two extra TCP connections per flow and the kernel's TCP work for them.  Two modes:

  splice  bytes move socket -> pipe -> socket with splice(2) (1 MiB pipe): no user-space copy at
          all.  The floor of a proxy that never looks at the bytes (kTLS, which this kernel lacks,
          would let a TLS proxy come close to it).
  copy    recv_into() a 256 KiB buffer, then send() it: one copy in and one copy out per proxy, as a
          user-space TLS proxy must do at the least (its encryption reads one buffer and writes another).

Written in Python on purpose: every syscall moves up to 1 MiB (splice) or 256 KiB (copy), so the
interpreter's share is a few thousand calls per GB, well under 1 % of the figure (the bench's
syscall count of the relay shows how many).  One thread per direction, blocking sockets; a
direction's EOF is passed on as shutdown(SHUT_WR), a reset closes both sides.

Run: python bench/relay.py client|server --listen IP:PORT [--peer IP:PORT] [--mode splice|copy]

The `relayaead` setup's relay is C (bench/relay_aead.c: the same header, AES-128-GCM records between
the relays); `build_aead` compiles it on demand into a build directory (cc, libcrypto; no download).

Invariants: the header is exactly 6 bytes (IPv4 address, port big-endian); bounded by its sockets
(no buffering beyond one pipe or one buffer per direction).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20  # /proc/sys/fs/pipe-max-size's default
COPY_BYTES = 256 * 1024  # what the native engine reads per recv()
MARK = 1337
HEADER = struct.Struct("!4sH")


AEAD_SOURCE = Path(__file__).with_name("relay_aead.c")


def build_aead(build_dir: Path) -> Path:
    """Compile bench/relay_aead.c into `build_dir` (once: an existing binary newer than the source
    is reused); returns the binary's path.  Raises RuntimeError with the compiler's output."""
    binary = Path(build_dir) / "relay_aead"
    if binary.exists() and binary.stat().st_mtime >= AEAD_SOURCE.stat().st_mtime:
        return binary
    cp = subprocess.run(["cc", "-O2", "-Wall", "-o", str(binary), str(AEAD_SOURCE), "-lcrypto", "-lpthread"],
                        capture_output=True, text=True, timeout=120)
    if cp.returncode != 0:
        raise RuntimeError(f"building {AEAD_SOURCE.name} failed: {cp.stderr.strip()[-500:]}")
    return binary


def original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


def encode_header(ip: str, port: int) -> bytes:
    return HEADER.pack(socket.inet_aton(ip), port)


def decode_header(data: bytes) -> tuple[str, int]:
    addr, port = HEADER.unpack(data)
    return socket.inet_ntoa(addr), port


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed before the header")
        buf += chunk
    return buf


def pump_splice(src: socket.socket, dst: socket.socket) -> None:
    r, w = os.pipe()
    try:
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # the default 64 KiB pipe still works, with more calls
        sfd, dfd = src.fileno(), dst.fileno()
        while True:
            n = os.splice(sfd, w, PIPE_BYTES)
            if n == 0:
                break
            while n:
                n -= os.splice(r, dfd, n)
    finally:
        os.close(r)
        os.close(w)


def pump_copy(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(COPY_BYTES)
    view = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if n == 0:
            break
        dst.sendall(view[:n])


def relay(a: socket.socket, b: socket.socket, mode: str) -> None:
    """Both directions until both have ended; then both sockets are closed."""
    pump = pump_splice if mode == "splice" else pump_copy

    def one_way(src: socket.socket, dst: socket.socket) -> None:
        try:
            pump(src, dst)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (a, b):  # a reset on one side ends both
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    other = threading.Thread(target=one_way, args=(b, a), daemon=True)
    other.start()
    one_way(a, b)
    other.join()
    a.close()
    b.close()


def handle(conn: socket.socket, role: str, peer: tuple[str, int] | None, mode: str) -> None:
    try:
        if role == "client":
            dst = original_dst(conn)
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)  # pass the REDIRECT rule
            up.connect(peer)
            up.sendall(encode_header(*dst))
        else:
            dst = decode_header(_recv_exactly(conn, HEADER.size))
            up = socket.create_connection(dst)
        for s in (conn, up):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        conn.close()
        return
    relay(conn, up, mode)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("role", choices=("client", "server"))
    p.add_argument("--listen", required=True, type=_addr)
    p.add_argument("--peer", type=_addr, help="the server relay (client role)")
    p.add_argument("--mode", choices=("splice", "copy"), default="splice")
    args = p.parse_args(argv)
    if args.role == "client" and args.peer is None:
        p.error("--peer is required for the client role")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(args.listen)
    lsock.listen(4096)
    print(f"relay {args.role} {args.mode} listening on {args.listen[0]}:{args.listen[1]}", flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=handle, args=(conn, args.role, args.peer, args.mode), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
