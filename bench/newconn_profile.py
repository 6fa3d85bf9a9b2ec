"""Where a new connection's time goes: py-spy on the client-side (or server-side) ztunnel-fast
during a burst of new connections (the figure the bench shows as "new conn per request").

    .venv/bin/python -m bench.newconn_profile [--engine native] [--count 3000] [--concurrency 8]
                                              [--worker-threads 2] [--no-profile]
                                              [--fast-path [both|client]] [--profile-side client|server]

Builds the two-pod Lab (client pod with its ztunnel-fast and outbound redirect, server pod with
its ztunnel-fast and an echo app), records one side (--profile-side) with `py-spy record --format raw` while
the client opens `count` short connections, then prints the rate, the proxy CPU per connection
(utime+stime of both ztunnel-fast processes from /proc, as the bench's "proxy CPU per new
connection"; inflated by py-spy's sampling unless --no-profile) and the share of samples per
function (inclusive, each function counted once per stack).  `--fast-path` runs both sides
with ZTUNNEL_FAST_PATH=true (outbound and inbound fast paths, as the bench's fastpath setup);
`--fast-path client` the client side only (the outbound fast path alone).  Bounded by --count; everything is torn down.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import tempfile
import time
from pathlib import Path

from ztunnel_fast import netns
from ztunnel_fast.demo.lab import Lab

from .procstat import Proxies, cpu_seconds
from .profiling import py_spy_binary


def ztunnel_pid(pod: netns.Pod) -> str:
    for pid in subprocess.run(["ip", "netns", "pids", pod.netns], capture_output=True, text=True).stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        if "ztunnel_fast run" in cmdline:
            return pid
    raise RuntimeError(f"no ztunnel-fast process in {pod.netns}")


def loop_thread_seconds(pid: str) -> float:
    """CPU seconds (user + system) of the process's main thread: the event loop, where the Python
    per connection runs (the workers are other threads)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shares(raw: Path, top: int) -> list[tuple[float, str]]:
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        for name in {frame.split(" (")[0] for frame in stack.split(";")}:
            counts[name] += int(n)
    return [(100.0 * v / total, k) for k, v in counts.most_common(top)] if total else []


FAST_LABEL = {None: "", "client": " with the outbound fast path (client side)",
              "both": " with the fast path on both sides"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench.newconn_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["native", "pure"], default="native")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--worker-threads", type=int, default=2, help="ZTUNNEL_WORKER_THREADS of both ztunnel-fast")
    ap.add_argument("--no-profile", action="store_true", help="no py-spy: rate and CPU per connection only")
    ap.add_argument("--fast-path", nargs="?", const="both", choices=["both", "client"], default=None,
                    help="ZTUNNEL_FAST_PATH=true on both ztunnel-fast (the bench's fastpath setup: outbound and "
                         "inbound fast paths), or on the client side only (outbound only)")
    ap.add_argument("--profile-side", choices=["client", "server"], default="client",
                    help="the ztunnel-fast py-spy records")
    a = ap.parse_args(argv)
    spy = None if a.no_profile else py_spy_binary()
    if spy is None and not a.no_profile:
        ap.error("py-spy not installed (make bench installs it)")
    work = Path(tempfile.mkdtemp(prefix="ztf-newconn-"))
    with netns.Topology() as topo:
        lab = Lab(topo, work, engine=a.engine, log_level="warn,ztunnel_fast::app=info")
        client = lab.pod("sleep", namespace="demo")
        server = lab.pod("httpbin", namespace="demo")
        lab.write_config()
        lab.app(server, "serve", "80", "echo", port=80)
        env = {"ZTUNNEL_WORKER_THREADS": str(a.worker_threads)}
        on, off = {"ZTUNNEL_FAST_PATH": "true"}, {"ZTUNNEL_FAST_PATH": "false"}  # said, not the default
        zc = lab.start_ztunnel(client, **env, **(on if a.fast_path else off))
        zs = lab.start_ztunnel(server, redirect=False, **env, **(on if a.fast_path == "both" else off))
        proxies = Proxies({"client": zc.proc.pid, "server": zs.proc.pid})
        raw = work / "client-ztunnel.raw"
        rec = None
        if spy is not None:
            rec = subprocess.Popen([spy, "record", "-p", ztunnel_pid((client if a.profile_side == "client" else server).pod), "-r", "200", "-f", "raw",
                                    "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        sides0 = {side: cpu_seconds(proxies.tree(side)) for side in ("client", "server")}
        pids = {"client": ztunnel_pid(client.pod), "server": ztunnel_pid(server.pod)}
        loops0 = {side: loop_thread_seconds(pid) for side, pid in pids.items()}
        cpu0 = proxies.cpu()
        try:
            out = lab.client(client, "echo", server.ip, "80", "--size", "64", "--count", str(a.count),
                             "--concurrency", str(a.concurrency), timeout=600)
            cpu = proxies.cpu() - cpu0
            sides = {side: cpu_seconds(proxies.tree(side)) - sides0[side] for side in sides0}
            loops = {side: loop_thread_seconds(pid) - loops0[side] for side, pid in pids.items()}
        finally:
            if rec is not None:
                rec.send_signal(2)  # SIGINT: py-spy writes what it has
                rec.wait(timeout=30)
    print(f"{out['ok']} connections in {out['seconds']} s ({out['ok'] / out['seconds']:.0f}/s) through the "
          f"{a.engine} engine{FAST_LABEL[a.fast_path]}, {a.worker_threads} worker thread(s); proxy CPU (both sides) "
          f"{cpu * 1e6 / max(1, out['ok']):,.0f} µs per connection ("
          + ", ".join(f"{side} {v * 1e6 / max(1, out['ok']):,.0f}" for side, v in sides.items()) + ")"
          + (" (under py-spy)" if rec else ""))
    print("of which the event loop thread (Python): "
          + ", ".join(f"{side} {v * 1e6 / max(1, out['ok']):,.0f} µs" for side, v in loops.items()))
    if rec is None:
        return 0
    print(f"{a.profile_side}-side ztunnel-fast samples by function (inclusive):")
    for pct, name in shares(raw, a.top):
        print(f"  {pct:5.1f}%  {name}")
    print(f"raw profile: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
