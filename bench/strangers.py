"""The cost of strangers: memory per pending (unauthenticated) connection on 15008, and whether RSS
comes back after a wave of them leaves.

  python -m bench.strangers [--count 2000] [--engines native,pure] [--json PATH]

Per engine, on a throw-away topology (pods `stranger` and `httpbin`, ztunnel-fast in httpbin's
netns, dedicated mode, MAX_PENDING_TLS_HANDSHAKES raised above --count and TLS_HANDSHAKE_TIMEOUT
above the hold time so neither bound interferes): RSS of the ztunnel-fast process at rest, with
--count silent TCP connections held (each accepted: ztunnel-fast's socket count has grown by
--count), and after they closed (once ztunnel-fast's socket count is back at rest, plus
--settle seconds).  Reported per engine: the three RSS figures, bytes per pending connection
((held - rest) / count) and the RSS left over after the wave (after - rest).

Every wait is bounded; the topology is removed at the end, on Ctrl-C and on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ztunnel_fast import netns
from ztunnel_fast.demo.lab import Lab

from . import procstat

MIB = 1 << 20
WAIT_S = 120.0  # seconds any one stage may take before the run is declared failed
SETTLE_S = 3.0  # seconds after the wave has gone before the closing RSS sample
APP_PORT = 80

# Runs in the stranger pod: hold COUNT silent connections until a line arrives on stdin.
HOLDER = r"""
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ip, count = sys.argv[1], int(sys.argv[2])
socks = [socket.create_connection((ip, 15008), timeout=30) for _ in range(count)]
print("open", len(socks), flush=True)
sys.stdin.readline()
for s in socks:
    s.close()
print("closed", flush=True)
"""


def _wait(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {WAIT_S:.0f}s")
        time.sleep(0.2)


def measure(engine: str, count: int, settle: float, waves_count: int = 3) -> dict:
    """One engine's figures (see the module docstring)."""
    topo = netns.Topology()
    try:
        lab = Lab(topo, Path(tempfile.mkdtemp(prefix="ztf-strangers-")), engine=engine, log_level="info")
        stranger = lab.pod("stranger", namespace="demo", mesh=False)
        httpbin = lab.pod("httpbin", namespace="demo")
        lab.write_config()
        lab.app(httpbin, "serve", str(APP_PORT), "echo", port=APP_PORT)
        zt = lab.start_ztunnel(httpbin, redirect=False, MAX_PENDING_TLS_HANDSHAKES=str(count * 2),
                               TLS_HANDSHAKE_TIMEOUT="3600s")
        pids = [zt.proc.pid]
        time.sleep(settle)  # let start-up allocations settle before the baseline
        rest_sockets = procstat.socket_fds(pids)
        rest = procstat.rss_bytes(pids)
        waves = []
        for _ in range(waves_count):
            holder = topo.popen(stranger.pod, [sys.executable, "-c", HOLDER, httpbin.ip, str(count)],
                                stdin=-1, stdout=-1, text=True)
            line = holder.stdout.readline().split()
            if line[:1] != ["open"]:
                raise RuntimeError(f"holder failed: {line}")
            _wait(lambda: procstat.socket_fds(pids) >= rest_sockets + count, f"{count} accepted connections")
            held = procstat.rss_bytes(pids)
            holder.stdin.write("close\n")
            holder.stdin.flush()
            holder.stdout.readline()
            holder.wait(timeout=WAIT_S)
            _wait(lambda: procstat.socket_fds(pids) <= rest_sockets, "the wave to leave")
            time.sleep(settle)
            waves.append((held, procstat.rss_bytes(pids)))
        held, after = waves[0]
        return {
            "engine": engine,
            "count": count,
            "rss_rest_mib": round(rest / MIB, 1),
            "rss_held_mib": round(held / MIB, 1),
            "rss_after_mib": round(after / MIB, 1),
            "bytes_per_pending": round((held - rest) / count),
            "left_after_wave_mib": round((after - rest) / MIB, 1),
            # later waves: RSS after each, to tell memory kept for reuse (flat) from a leak (growing)
            "rss_after_later_waves_mib": [round(a / MIB, 1) for _, a in waves[1:]],
        }
    finally:
        topo.teardown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.strangers", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000, help="silent connections in the wave")
    p.add_argument("--engines", default="native,pure")
    p.add_argument("--settle", type=float, default=SETTLE_S, help="seconds before the rest and after samples")
    p.add_argument("--waves", type=int, default=3, help="waves, one after the other (the first is reported)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    results = [measure(e, args.count, args.settle, args.waves) for e in args.engines.split(",") if e]
    print(f"{'engine':8} {'count':>6} {'rest MiB':>9} {'held MiB':>9} {'after MiB':>10} {'B/pending':>10} {'left MiB':>9}")
    for r in results:
        print(f"{r['engine']:8} {r['count']:6d} {r['rss_rest_mib']:9.1f} {r['rss_held_mib']:9.1f} "
              f"{r['rss_after_mib']:10.1f} {r['bytes_per_pending']:10d} {r['left_after_wave_mib']:9.1f}  "
              f"after later waves: {r['rss_after_later_waves_mib']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
