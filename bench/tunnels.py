"""Many concurrent open tunnels: a holder (server pod) and an opener (client pod).

Run inside pods as a standalone script (no imports from the harness):

  tunnels.py serve IP PORT
      accept everything; echo whatever arrives on each connection until EOF.
  tunnels.py open IP PORT COUNT [--parallel P] [--timeout S] [--open-timeout S] [--stall S] [--hold S]
      open COUNT connections (at most P connects in flight), each proven end to end by a 1-byte
      round trip, giving up after --open-timeout or --stall seconds without a new tunnel; print
      {"event": "open", ...}; then obey stdin lines:
        check -> one more 1-byte round trip on every connection, print {"event": "check", ...}
        close -> close them all, print {"event": "closed", ...} and exit
      stdin EOF or `--hold` seconds without a command also close and exit.

Every wait is bounded by the timeouts given; output is one JSON object per line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import sys
import time


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve(ip: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, ip, port, backlog=4096)
    async with server:
        await server.serve_forever()


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
    writer.write(b"x")
    await asyncio.wait_for(writer.drain(), timeout)
    got = await asyncio.wait_for(reader.readexactly(1), timeout)
    if got != b"x":
        raise ValueError(f"unexpected byte {got!r}")


async def open_many(ip: str, port: int, count: int, parallel: int, timeout: float, open_timeout: float,
                    stall: float, hold: float) -> None:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failures: collections.Counter[str] = collections.Counter()
    sem = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with sem:
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
                await _roundtrip(reader, writer, timeout)
                conns.append((reader, writer))
            except Exception as exc:  # noqa: BLE001 - counted by kind, reported
                failures[type(exc).__name__] += 1
                if writer is not None:
                    writer.close()

    start = time.monotonic()
    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    pending = set(tasks)
    last_count, last_progress = 0, start
    while pending:  # bounded: open_timeout overall, and `stall` seconds without a new tunnel
        _, pending = await asyncio.wait(pending, timeout=1.0)
        now = time.monotonic()
        if len(conns) != last_count:
            last_count, last_progress = len(conns), now
        if now - start > open_timeout or now - last_progress > stall:
            break
    for t in pending:
        t.cancel()
    if pending:
        failures["gave_up_waiting"] += len(pending)
        await asyncio.wait(pending, timeout=5)
    _say({"event": "open", "requested": count, "opened": len(conns), "failures": dict(failures),
          "seconds": round(time.monotonic() - start, 3)})

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    deadline = time.monotonic() + hold
    while True:
        try:
            line = await asyncio.wait_for(stdin.readline(), max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            line = b""
        cmd = line.decode().strip()
        if cmd == "check":
            t0 = time.monotonic()
            results = await asyncio.gather(*(_roundtrip(r, w, timeout) for r, w in conns), return_exceptions=True)
            bad = collections.Counter(type(r).__name__ for r in results if isinstance(r, BaseException))
            _say({"event": "check", "alive": len(conns) - sum(bad.values()), "failures": dict(bad),
                  "seconds": round(time.monotonic() - t0, 3)})
            continue
        break  # "close", EOF or hold expired
    for _, w in conns:
        w.close()
    await asyncio.sleep(0.5)  # let the FINs leave before the process exits
    _say({"event": "closed", "closed": len(conns)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("ip")
    s.add_argument("port", type=int)
    o = sub.add_parser("open")
    o.add_argument("ip")
    o.add_argument("port", type=int)
    o.add_argument("count", type=int)
    o.add_argument("--parallel", type=int, default=200)
    o.add_argument("--timeout", type=float, default=30.0, help="per connect / round trip")
    o.add_argument("--open-timeout", type=float, default=240.0, help="for opening all of them")
    o.add_argument("--stall", type=float, default=45.0, help="stop opening after this long without a new tunnel")
    o.add_argument("--hold", type=float, default=300.0, help="close after this long without a command")
    a = p.parse_args(argv)
    _raise_nofile()
    if a.cmd == "serve":
        asyncio.run(serve(a.ip, a.port))
    else:
        asyncio.run(open_many(a.ip, a.port, a.count, a.parallel, a.timeout, a.open_timeout, a.stall, a.hold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
