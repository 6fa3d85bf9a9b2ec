"""Apps for tests/e2e/test_transfer_shapes.py, run inside pods: `python -m tests.e2e.shapes_peer MODE ...`.

Modes (every wait bounded by --timeout; every socket closed before exit; one JSON line at the end):
  serve PORT --action stall|reset-after|send
      stall        accept one connection, read nothing until --release (a file) exists, then read to
                   EOF and report {"received", "sha256"}
      reset-after  accept one connection, read --size bytes, then reset it (RST: SO_LINGER 0)
      send         accept one connection, send --size bytes of the seeded payload until done or
                   the peer resets; report {"sent", "error"}
  send IP PORT --size N
      connect, send N bytes of the seeded payload (progress lines {"progress": bytes} as it goes),
      half-close, wait for EOF; report {"sent", "sha256", "error"}
  recv-reset IP PORT --size N
      connect, read N bytes, then reset the connection; report {"received", "error"}
  hbone-echo --ip IP --root PEM --cert-dir DIR --authority A --size N --record-size R
      an independent HBONE client (stdlib ssl, hyper-h2) on IP:15008 whose every TLS record carries
      at most R bytes (R=1: a record per byte), one CONNECT tunnel, N bytes echoed and compared
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import sys
import time

CHUNK = 256 * 1024


def seeded(size: int, seed: int = 7) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 4096  # 128 KiB, not a power-of-two period of frames
    block = block[:-5]
    return (block * (size // len(block) + 1))[:size]


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def serve(args) -> dict:
    with socket.create_server(("0.0.0.0", args.port), reuse_port=True) as srv:
        srv.settimeout(args.timeout)
        print(json.dumps({"listening": args.port}), flush=True)
        conn, _ = srv.accept()
    conn.settimeout(args.timeout)
    if args.action == "stall":
        deadline = time.monotonic() + args.timeout
        while not os.path.exists(args.release):
            if time.monotonic() > deadline:
                conn.close()
                return {"error": "never released"}
            time.sleep(0.05)
        got, n = hashlib.sha256(), 0
        while True:
            data = conn.recv(CHUNK)
            if not data:
                break
            got.update(data)
            n += len(data)
        conn.close()
        return {"received": n, "sha256": got.hexdigest()}
    if args.action == "reset-after":
        n = 0
        while n < args.size:
            data = conn.recv(min(CHUNK, args.size - n))
            if not data:
                break
            n += len(data)
        reset(conn)
        return {"received": n}
    payload, sent, error = seeded(args.size), 0, None
    try:
        while sent < len(payload):
            sent += conn.send(payload[sent:sent + CHUNK])
        conn.shutdown(socket.SHUT_WR)
    except OSError as exc:
        error = exc.__class__.__name__
    conn.close()
    return {"sent": sent, "error": error}


def send(args) -> dict:
    payload = seeded(args.size)
    sock = socket.create_connection((args.ip, args.port), timeout=args.timeout)
    sent, error, mark = 0, None, 0
    try:
        while sent < len(payload):
            sent += sock.send(payload[sent:sent + CHUNK])
            if sent - mark >= 1 << 20:
                mark = sent
                emit({"progress": sent})
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(CHUNK):
            pass
    except OSError as exc:
        error = exc.__class__.__name__
    sock.close()
    return {"sent": sent, "sha256": hashlib.sha256(payload[:sent]).hexdigest(), "error": error}


def recv_reset(args) -> dict:
    sock = socket.create_connection((args.ip, args.port), timeout=args.timeout)
    n, error = 0, None
    try:
        while n < args.size:
            data = sock.recv(min(CHUNK, args.size - n))
            if not data:
                error = "eof"
                break
            n += len(data)
    except OSError as exc:
        error = exc.__class__.__name__
    reset(sock)
    return {"received": n, "error": error}


class SmallRecords:
    """An ssl socket whose writes go out as TLS records of at most `size` bytes each (stdlib ssl
    makes one record per send() call)."""

    def __init__(self, sock, size: int):
        self.sock = sock
        self.size = size
        self.records = 0

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(view), self.size):
            self.sock.sendall(view[i:i + self.size])
            self.records += 1

    def __getattr__(self, name):
        return getattr(self.sock, name)


def hbone_echo(args) -> dict:
    sys.path.insert(0, str(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    from tests.e2e import badpeer

    ns = argparse.Namespace(ip=args.ip, port=15008, timeout=args.timeout, root=args.root, cert_dir=args.cert_dir)
    sock = badpeer.tls_connect(ns)
    wrapped = SmallRecords(sock, args.record_size)
    try:
        out = badpeer.h2_echo(wrapped, args.authority, args.size, args.timeout)
    finally:
        sock.close()
    out["records_sent"] = wrapped.records
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    s.add_argument("--action", choices=["stall", "reset-after", "send"], required=True)
    s.add_argument("--size", type=int, default=0)
    s.add_argument("--release", default="")
    for name in ("send", "recv-reset"):
        c = sub.add_parser(name)
        c.add_argument("ip")
        c.add_argument("port", type=int)
        c.add_argument("--size", type=int, required=True)
    h = sub.add_parser("hbone-echo")
    h.add_argument("--ip", required=True)
    h.add_argument("--root", required=True)
    h.add_argument("--cert-dir", required=True)
    h.add_argument("--authority", required=True)
    h.add_argument("--size", type=int, required=True)
    h.add_argument("--record-size", type=int, required=True)
    for sp in (s, *sub.choices.values()):
        if "--timeout" not in sp._option_string_actions:
            sp.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    modes = {"serve": serve, "send": send, "recv-reset": recv_reset, "hbone-echo": hbone_echo}
    try:
        emit(modes[args.mode](args))
    except Exception as exc:  # noqa: BLE001 - reported, the test decides
        emit({"exception": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
