"""Test applications run inside pod network namespaces (`python -m ztunnel_fast.demo.apps ...`).

Servers: `serve PORT MODE [--name N]` with MODE one of
  echo    stream every byte back; on the client's FIN finish echoing, then FIN
  whoami  write "<name> <peer ip>\n" and close
  reset   read until a byte arrives, then close with RST
  http    a minimal HTTP/1.1 server (stdlib) whose page title is `httpbin.org`
  halfclose  send --size bytes, FIN first, then read the client's bytes to EOF and print a JSON
          line {received, sha256} to stdout
Clients print one JSON object on stdout:
  echo  HOST PORT --size N [--count C --concurrency K] [--half-close-first]  sha256 both ways per connection
  read  HOST PORT   read until EOF or reset, report bytes and whether a reset was seen
  whoami HOST PORT --count C   collect the servers' names in order
  halfclose HOST PORT --size N   read the server's bytes to EOF (it half-closed first), then send N
          bytes and FIN
  hold  HOST PORT --seconds S   one echo round trip, then hold the connection and report how it ended
  hold-many HOST PORT --count C --size N --seconds S   open C connections one after the other (each
          proven by an echo round trip), print {"event": "established", "count": ...}, hold them
          until a line or EOF on stdin (at most S s), then echo N bytes on each (sha256 checked)

Every loop is bounded by --size/--count and a timeout; nothing here talks to anything but the
address it is given.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import struct
import sys
import time

CHUNK = 256 * 1024


def _payload(size: int, seed: int) -> bytes:
    """Deterministic pseudo-random bytes (fast): sha256 counter blocks, repeated."""
    block = b"".join(hashlib.sha256(f"{seed}-{i}".encode()).digest() for i in range(2048))  # 64 KiB
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


# --------------------------------------------------------------------------------------- servers
async def serve(port: int, mode: str, name: str, size: int = 1024) -> None:
    if mode == "http":
        return await serve_http(port, name)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = writer.get_extra_info("peername")
        print(f"accepted {peer[0]}:{peer[1]}", flush=True)  # tests read who reached the app
        try:
            if mode == "echo":
                while True:
                    data = await reader.read(CHUNK)
                    if not data:
                        break
                    writer.write(data)
                    await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                await writer.drain()
                await reader.read()  # wait for the peer to finish before closing
            elif mode == "whoami":
                writer.write(f"{name} {peer[0]}\n".encode())
                await writer.drain()
            elif mode == "halfclose":
                writer.write(_payload(size, 7))
                await writer.drain()
                writer.write_eof()
                digest, received = hashlib.sha256(), 0
                while True:
                    data = await reader.read(CHUNK)
                    if not data:
                        break
                    digest.update(data)
                    received += len(data)
                print(json.dumps({"received": received, "sha256": digest.hexdigest()}), flush=True)
            elif mode == "reset":
                await reader.read(1)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host=None, port=port, reuse_address=True, limit=CHUNK)
    print(f"listening {port} {mode}", flush=True)
    async with server:
        await server.serve_forever()


async def serve_http(port: int, name: str) -> None:
    page = (
        "<!DOCTYPE html>\n<html>\n<head>\n    <title>httpbin.org</title>\n</head>\n"
        f"<body><h1>httpbin.org</h1><p>served by {name}</p></body>\n</html>\n"
    ).encode()

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method = head.split(b" ", 1)[0]
                body = b"" if method == b"HEAD" else page
                writer.write(
                    b"HTTP/1.1 200 OK\r\nServer: ztunnel-fast-demo\r\nContent-Type: text/html; charset=utf-8\r\n"
                    + f"Content-Length: {len(page)}\r\nX-Served-By: {name}\r\n\r\n".encode() + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host=None, port=port, reuse_address=True)
    print(f"listening {port} http", flush=True)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------------------- clients
async def echo_once(host: str, port: int, size: int, seed: int, half_close_first: bool, source: str | None = None,
                    chunk_delay: float = 0.0) -> dict:
    payload = _payload(size, seed)
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection(host, port, limit=CHUNK, local_addr=local)
    sent_hash = hashlib.sha256(payload).hexdigest()
    recv = hashlib.sha256()
    received = 0

    async def send():
        view = memoryview(payload)
        for off in range(0, len(view), CHUNK):
            writer.write(view[off:off + CHUNK])
            await writer.drain()
            if chunk_delay:
                await asyncio.sleep(chunk_delay)  # paced: keeps the tunnel in flight for a while
        writer.write_eof()

    async def receive():
        nonlocal received
        while True:
            data = await reader.read(CHUNK)
            if not data:
                return
            recv.update(data)
            received += len(data)

    try:
        if half_close_first:
            await send()
            await receive()
        else:
            await asyncio.gather(send(), receive())
        error = None
    except (ConnectionError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()
    return {"sent": size, "received": received, "sent_sha256": sent_hash, "received_sha256": recv.hexdigest(),
            "ok": error is None and received == size and recv.hexdigest() == sent_hash, "error": error}


async def echo_many(host, port, size, count, concurrency, half_close_first, source=None, chunk_delay=0.0) -> dict:
    sem = asyncio.Semaphore(concurrency)
    results = []

    async def one(i):
        async with sem:
            try:
                results.append(await asyncio.wait_for(echo_once(host, port, size, i, half_close_first, source, chunk_delay), 120))
            except (asyncio.TimeoutError, OSError) as exc:
                results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    failed = [r for r in results if not r["ok"]]
    # A connection that ended cleanly (no error) yet returned other bytes than it sent: corruption
    # or silent truncation, never an acceptable outcome (a failure must surface as an error).
    mismatched = sum(1 for r in results if r.get("error") is None and "received_sha256" in r
                     and r["received_sha256"] != r["sent_sha256"])
    out = {"count": count, "ok": len(results) - len(failed), "failed": len(failed), "mismatched": mismatched,
           "errors": [r["error"] for r in failed][:5],
           "seconds": round(time.monotonic() - start, 3)}
    if count == 1:
        out.update(results[0])
    return out


async def read_all(host: str, port: int, send: bytes) -> dict:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(send)
    await writer.drain()
    total, reset, error = 0, False, None
    try:
        while True:
            data = await asyncio.wait_for(reader.read(CHUNK), 30)
            if not data:
                break
            total += len(data)
    except ConnectionResetError:
        reset = True
    except (OSError, asyncio.TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    writer.close()
    return {"received": total, "reset": reset, "error": error}


async def hold(host: str, port: int, seconds: float) -> dict:
    """Open a connection, check one echo round trip, then hold it until the far side ends it (or
    `seconds` pass): reports how it ended."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"ping")
    await writer.drain()
    first = await asyncio.wait_for(reader.readexactly(4), 30)
    print(json.dumps({"event": "established", "echo": first.decode()}), flush=True)
    ended = "timeout"
    try:
        data = await asyncio.wait_for(reader.read(CHUNK), seconds)
        ended = "eof" if not data else "data"
    except ConnectionResetError:
        ended = "reset"
    except asyncio.TimeoutError:
        pass
    writer.close()
    return {"echo": first.decode(), "ended": ended, "seconds": round(time.monotonic() - start, 3)}


async def hold_many(host: str, port: int, count: int, size: int, seconds: float) -> dict:
    """Many tunnels held open at once (e.g. more than one HBONE connection's streams), then each
    proven intact: see the module docstring (`hold-many`)."""
    conns, errors = [], []
    for _ in range(count):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=CHUNK), 30)
            writer.write(b"ping")
            await writer.drain()
            if await asyncio.wait_for(reader.readexactly(4), 30) != b"ping":
                raise ConnectionError("the round trip came back changed")
            conns.append((reader, writer))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"event": "established", "count": len(conns)}), flush=True)
    loop = asyncio.get_running_loop()
    told = loop.create_future()  # stdin readable: a line or EOF (a pipe; no thread left blocked)
    loop.add_reader(sys.stdin.fileno(), lambda: told.done() or told.set_result(None))
    try:
        await asyncio.wait_for(told, seconds)
    except asyncio.TimeoutError:
        pass
    finally:
        loop.remove_reader(sys.stdin.fileno())

    async def finish(seed: int, reader, writer) -> dict:
        payload = _payload(size, seed)
        recv = hashlib.sha256()
        try:
            writer.write(payload)
            writer.write_eof()
            await writer.drain()
            while True:
                data = await asyncio.wait_for(reader.read(CHUNK), 30)
                if not data:
                    break
                recv.update(data)
            error = None
        except (OSError, asyncio.TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()
        same = recv.digest() == hashlib.sha256(payload).digest()
        return {"error": error, "ok": error is None and same, "mismatched": error is None and not same}

    results = await asyncio.gather(*(finish(i, r, w) for i, (r, w) in enumerate(conns)))
    errors += [r["error"] for r in results if r["error"]]
    return {"count": count, "ok": sum(r["ok"] for r in results), "failed": count - sum(r["ok"] for r in results),
            "mismatched": sum(r["mismatched"] for r in results), "errors": errors[:5]}


async def halfclose(host: str, port: int, size: int) -> dict:
    """The server sends first and half-closes; we read to EOF, then send our bytes and FIN."""
    reader, writer = await asyncio.open_connection(host, port, limit=CHUNK)
    digest, received, error = hashlib.sha256(), 0, None
    try:
        while True:
            data = await asyncio.wait_for(reader.read(CHUNK), 30)
            if not data:
                break
            digest.update(data)
            received += len(data)
        payload = _payload(size, 11)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 30)
    except (OSError, asyncio.TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    writer.close()
    return {"received": received, "received_sha256": digest.hexdigest(), "sent": size,
            "sent_sha256": hashlib.sha256(_payload(size, 11)).hexdigest(),
            "expected_sha256": hashlib.sha256(_payload(received, 7)).hexdigest(), "error": error}


async def whoami(host: str, port: int, count: int) -> dict:
    names = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, port)
        line = await asyncio.wait_for(reader.readline(), 30)
        names.append(line.decode().strip())
        writer.close()
    return {"names": names}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ztunnel_fast.demo.apps")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    s.add_argument("mode", choices=["echo", "whoami", "reset", "http", "halfclose"])
    s.add_argument("--name", default=os.uname().nodename)
    s.add_argument("--size", type=int, default=1024)
    e = sub.add_parser("echo")
    e.add_argument("host")
    e.add_argument("port", type=int)
    e.add_argument("--size", type=int, default=1024)
    e.add_argument("--count", type=int, default=1)
    e.add_argument("--concurrency", type=int, default=1)
    e.add_argument("--half-close-first", action="store_true")
    e.add_argument("--source", default=None, help="bind this source IP")
    e.add_argument("--chunk-delay", type=float, default=0.0, help="seconds to wait after each 256 KiB sent")
    r = sub.add_parser("read")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("--send", default="x")
    w = sub.add_parser("whoami")
    w.add_argument("host")
    w.add_argument("port", type=int)
    w.add_argument("--count", type=int, default=4)
    hc = sub.add_parser("halfclose")
    hc.add_argument("host")
    hc.add_argument("port", type=int)
    hc.add_argument("--size", type=int, default=1024)
    hd = sub.add_parser("hold")
    hd.add_argument("host")
    hd.add_argument("port", type=int)
    hd.add_argument("--seconds", type=float, default=30.0)
    hm = sub.add_parser("hold-many")
    hm.add_argument("host")
    hm.add_argument("port", type=int)
    hm.add_argument("--count", type=int, default=10)
    hm.add_argument("--size", type=int, default=1024)
    hm.add_argument("--seconds", type=float, default=120.0)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        asyncio.run(serve(a.port, a.mode, a.name, a.size))
        return 0
    if a.cmd == "echo":
        out = asyncio.run(echo_many(a.host, a.port, a.size, a.count, a.concurrency, a.half_close_first, a.source,
                                    a.chunk_delay))
    elif a.cmd == "read":
        out = asyncio.run(read_all(a.host, a.port, a.send.encode()))
    elif a.cmd == "hold":
        out = asyncio.run(hold(a.host, a.port, a.seconds))
    elif a.cmd == "hold-many":
        out = asyncio.run(hold_many(a.host, a.port, a.count, a.size, a.seconds))
    elif a.cmd == "halfclose":
        out = asyncio.run(halfclose(a.host, a.port, a.size))
    else:
        out = asyncio.run(whoami(a.host, a.port, a.count))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
