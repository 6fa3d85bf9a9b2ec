"""Where a new connection's time goes: py-spy on the client-side ztunnel-fast during a burst of
new connections (the figure the bench shows as "new conn per request").

    .venv/bin/python -m bench.newconn_profile [--engine native] [--count 3000] [--concurrency 8]

Builds the two-pod Lab (client pod with its ztunnel-fast and outbound redirect, server pod with
its ztunnel-fast and an echo app), records the client side with `py-spy record --format raw` while
the client opens `count` short connections, then prints the share of samples per function
(inclusive, each function counted once per stack).  Bounded by --count; everything is torn down.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import tempfile
import time
from pathlib import Path

from ztunnel_fast import netns
from ztunnel_fast.demo.lab import Lab

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench.newconn_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["native", "pure"], default="native")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args(argv)
    spy = py_spy_binary()
    if spy is None:
        ap.error("py-spy not installed (make bench installs it)")
    work = Path(tempfile.mkdtemp(prefix="ztf-newconn-"))
    with netns.Topology() as topo:
        lab = Lab(topo, work, engine=a.engine, log_level="warn,ztunnel_fast::app=info")
        client = lab.pod("sleep", namespace="demo")
        server = lab.pod("httpbin", namespace="demo")
        lab.write_config()
        lab.app(server, "serve", "80", "echo", port=80)
        lab.start_ztunnel(client)
        lab.start_ztunnel(server, redirect=False)
        raw = work / "client-ztunnel.raw"
        rec = subprocess.Popen([spy, "record", "-p", ztunnel_pid(client.pod), "-r", "200", "-f", "raw",
                                "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        out = lab.client(client, "echo", server.ip, "80", "--size", "64", "--count", str(a.count),
                         "--concurrency", str(a.concurrency), timeout=600)
        rec.send_signal(2)  # SIGINT: py-spy writes what it has
        rec.wait(timeout=30)
    print(f"{out['ok']} connections in {out['seconds']} s ({out['ok'] / out['seconds']:.0f}/s) through the "
          f"{a.engine} engine; client-side ztunnel-fast samples by function (inclusive):")
    for pct, name in shares(raw, a.top):
        print(f"  {pct:5.1f}%  {name}")
    print(f"raw profile: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
