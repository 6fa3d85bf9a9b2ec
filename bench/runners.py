"""One function per figure: each runs its load generator in the client pod of a started setup and
returns a plain dict of raw results (what `report` turns into metrics).

Invariants: every command has a timeout derived from Settings; a function either returns a
complete raw result or raises (BenchError or a subprocess/parse error) - the caller records the
failure and rebuilds the setup, so one hung figure never hides the others.  CPU and RSS are
sampled from /proc around the runs (procstat), never from the tools' own reports.  Syscalls are
counted (syscount) on a transfer of their own, never on a timed one.

Most functions take a `Ctx` (one started setup).  The variant figures (`scaling`,
`other_topology`) take a `Labs`: they build their own fresh setups (other worker threads, other
topology) one at a time, each checked with `path_check` before it is measured.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from . import parse, procstat, syscount
from . import scaling as scaling_figure
from .lab import HOLD_PORT, HTTP_PORT, IPERF_PORT, TUNNELS_SCRIPT, BenchLab
from .procstat import Proxies
from .settings import Settings

SCALING_PAUSE_S = 0.5  # between the alternated scaling runs
GB = 1e9  # CPU seconds per GB: decimal gigabytes of payload received by the server


class BenchError(RuntimeError):
    pass


@dataclass
class Ctx:
    bl: BenchLab
    proxies: Proxies
    settings: Settings
    workdir: Path
    pooled: bool = True  # the proxies keep an HBONE connection open (the plain relays do not)

    @property
    def server_ip(self) -> str:
        return self.bl.server.ip


class Labs(Protocol):
    settings: Settings

    def open(self, threads: int | None = None, topology: str | None = None) -> AbstractContextManager[Ctx]:
        """A fresh, checked setup with these worker threads / this topology; torn down on exit."""


def _check_alive(ctx: Ctx) -> None:
    dead = ctx.proxies.dead()
    if dead:
        raise BenchError(f"proxy exited ({', '.join(dead)} side); logs in {ctx.workdir}")


# ------------------------------------------------------------------------------------------- idle
def idle_rss(ctx: Ctx) -> dict:
    """RSS of each proxy after start-up and a quiet pause, before any traffic."""
    time.sleep(ctx.settings.settle_seconds)
    _check_alive(ctx)
    return {"rss": ctx.proxies.rss_by_side()}


def path_check(ctx: Ctx) -> dict:
    """One GET through the setup; for proxied setups an HBONE connection must now exist (proof that
    the traffic went through the proxies and not around them)."""
    status = ctx.bl.http_check()
    if status != 200:
        raise BenchError(f"GET http://{ctx.server_ip}:{HTTP_PORT}/ through the setup returned {status or 'nothing'}")
    hbone = ctx.bl.established(ctx.bl.client, "dport = :15008")
    if ctx.proxies and ctx.pooled and hbone < 1:
        raise BenchError("no HBONE connection from the client pod after a request: traffic bypassed the proxy")
    out = {"http_status": status, "hbone_connections": hbone}
    if ctx.proxies and not ctx.pooled:  # a relay closes its upstream with the flow: the capture rule is the proof
        cp = ctx.bl.run(ctx.bl.client, ["iptables-legacy", "-w", "10", "-t", "nat", "-L", "OUTPUT", "-v", "-n", "-x"])
        out["redirected_packets"] = parse.redirect_packets(cp.stdout)
        if out["redirected_packets"] < 1:
            raise BenchError("the outbound REDIRECT rule counted no packet: traffic bypassed the relay")
    return out


# ----------------------------------------------------------------------------------------- iperf3
STALL_SECONDS = 15.0  # no payload reaching the iperf3 server for this long = the tunnel is stuck
POLL_SECONDS = 1.0


def _server_bytes(ctx: Ctx) -> int:
    """Bytes received so far by the iperf3 server's sockets (kernel counters, from `ss -ti`)."""
    cp = ctx.bl.run(ctx.bl.server, ["ss", "-Htin", "state", "established", f"( sport = :{IPERF_PORT} )"], check=False)
    return parse.ss_bytes_received(cp.stdout)


def _iperf(ctx: Ctx, args: list[str], timeout: float) -> dict:
    """Run an iperf3 client; a watchdog ends it early when no payload reaches the server for
    STALL_SECONDS (a stuck tunnel costs seconds, not the whole timeout)."""
    _check_alive(ctx)
    out_path = ctx.workdir / "iperf3-client.json"
    argv = ["iperf3", "-c", ctx.server_ip, "-p", str(IPERF_PORT), "-J", "--connect-timeout", "5000", *args]
    user0, sys0 = ctx.proxies.cpu_split()
    start = time.monotonic()
    with open(out_path, "wb") as out:  # a file, not a pipe: -J output of 4 streams outgrows a pipe buffer
        proc = ctx.bl.topology.popen(ctx.bl.client.pod, argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        last_bytes, last_change = -1, start
        while proc.poll() is None:
            now = time.monotonic()
            if now - start > timeout:
                raise BenchError(f"iperf3 {' '.join(args)} did not finish in {timeout:.0f}s")
            received = _server_bytes(ctx)
            if received != last_bytes:
                last_bytes, last_change = received, now
            elif now - last_change > STALL_SECONDS:
                raise BenchError(f"iperf3 {' '.join(args)}: no payload reached the server for {STALL_SECONDS:.0f}s "
                                 f"(tunnel stalled after {received:,} bytes on the current connections)")
            time.sleep(POLL_SECONDS)
    finally:
        ctx.bl.topology.stop(proc)
    user1, sys1 = ctx.proxies.cpu_split()
    cpu = (user1 - user0) + (sys1 - sys0)
    result = parse.parse_iperf3(out_path.read_text(errors="replace")).as_dict()
    result["proxy_cpu_seconds"] = round(cpu, 3)
    gb = result["bytes_received"] / GB
    result["proxy_cpu_s_per_gb"] = round(cpu / gb, 4) if ctx.proxies and gb else None
    # the split (JSON only): user = what the proxies do themselves (AEAD, copies, framing), system =
    # the kernel's share charged to them (syscalls, copies to and from user space, TCP, softirq)
    result["proxy_cpu_user_s_per_gb"] = round((user1 - user0) / gb, 4) if ctx.proxies and gb else None
    result["proxy_cpu_sys_s_per_gb"] = round((sys1 - sys0) / gb, 4) if ctx.proxies and gb else None
    _check_alive(ctx)
    return result


def throughput(ctx: Ctx, streams: int) -> dict:
    s = ctx.settings
    args = ["-P", str(streams), "-t", f"{s.iperf_seconds:g}", "-O", str(s.iperf_omit)]
    return _iperf(ctx, args, timeout=s.iperf_seconds + s.iperf_omit + 30)


def cpu_per_gb(ctx: Ctx) -> dict:
    """A fixed-size 1-stream transfer; proxy CPU seconds (both sides, utime+stime) per GB received."""
    n = ctx.settings.cpu_bytes
    return _iperf(ctx, ["-P", "1", "-n", str(n)], timeout=30 + n / 10e6)  # bound: >= 10 MB/s


_TOOL: dict[str, str] = {}  # syscall_tool setting -> the tool that works here (probed once per run)


def syscalls(ctx: Ctx) -> dict:
    """Syscalls of both proxies (every thread) during a fixed-size 1-stream transfer of their own,
    by name and by type (read/recv*, write/send*, epoll_*, other), per GB received."""
    s = ctx.settings
    if s.syscall_tool not in _TOOL:
        _TOOL[s.syscall_tool] = syscount.choose_tool(s.syscall_tool)
    tool = _TOOL[s.syscall_tool]
    _check_alive(ctx)
    n = s.syscall_bytes
    slow = 1e6 if tool == "strace" else 10e6  # bound: >= 1 MB/s under strace, 10 MB/s under perf
    counter = syscount.Counter(ctx.proxies, tool, ctx.workdir)
    try:
        transfer = _iperf(ctx, ["-P", "1", "-n", str(n)], timeout=30 + n / slow)
        counts = counter.stop()
    finally:
        counter.abort()
    total = parse.merge_counts(*counts.values())
    by_type = parse.syscalls_by_type(total)
    received = transfer["bytes_received"]
    named = {k: v for k, v in sorted(total.items(), key=lambda kv: -kv[1]) if k != parse.TOTAL and v}
    return {
        "tool": "perf stat (syscall tracepoints)" if tool == "perf" else "strace -c -f",
        "bytes_received": received, "seconds": transfer["seconds"],
        "counts_by_side": counts, "by_type": by_type,
        "per_gb": {k: round(v, 1) for k, v in parse.per_gb(by_type, received).items()},
        "by_name_per_gb": {k: round(v, 1) for k, v in parse.per_gb(named, received).items()},
        # CPU while counted: perf's counters cost little, strace's a lot; shown for reference only
        "proxy_cpu_s_per_gb_while_counted": transfer["proxy_cpu_s_per_gb"],
    }


# -------------------------------------------------------------------------------------------- wrk
def http(ctx: Ctx, new_connection: bool) -> dict:
    """wrk closed loop against nginx in the server pod; keep-alive, or `Connection: close` so that
    every request opens a new connection (and, through a proxy, a new tunnel)."""
    s = ctx.settings
    _check_alive(ctx)
    lua = ctx.workdir / "wrk-report.lua"
    lua.write_text(parse.WRK_LUA)
    argv = ["wrk", "-t", str(s.wrk_threads), "-c", str(s.wrk_connections), "-d", f"{max(1, round(s.wrk_seconds))}s",
            "--timeout", "5s", "--latency", "-s", str(lua)]
    if new_connection:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{ctx.server_ip}:{HTTP_PORT}/")
    timeout = s.wrk_seconds + 30
    cpu0, machine0, main0 = ctx.proxies.cpu(), procstat.machine_cpu(), ctx.proxies.main_thread_cpu()
    try:
        cp = ctx.bl.run(ctx.bl.client, argv, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish in {timeout:.0f}s") from None
    cpu, machine1, main1 = ctx.proxies.cpu() - cpu0, procstat.machine_cpu(), ctx.proxies.main_thread_cpu()
    if cp.returncode != 0:
        raise BenchError(f"wrk exited {cp.returncode}: {(cp.stderr.strip() or cp.stdout.strip())[-500:]}")
    res = parse.parse_wrk(cp.stdout)
    if res.requests == 0:
        raise BenchError(f"wrk completed no request: {cp.stdout.strip()[-500:]}")
    _check_alive(ctx)
    out = res.as_dict()
    # CPU of both proxies (all threads) over the whole wrk run, per request completed: with
    # `Connection: close` that is per new connection (one tunnel each, through both proxies)
    out["proxy_cpu_seconds"] = round(cpu, 3) if ctx.proxies else None
    out["proxy_cpu_us_per_request"] = round(cpu * 1e6 / res.requests, 2) if ctx.proxies else None
    # the share of the machine's CPUs left idle meanwhile: near 0, the run was bound by the machine
    # (wrk, nginx and both proxies together), not by one thread of a proxy
    out["machine_idle"] = procstat.idle_fraction(machine0, machine1)
    # the busier side's main thread (ztunnel-fast: the event loop) per request: the serial part of
    # a new connection, which more worker threads do not spread (its one core caps the rate at 1e6 / it)
    mains = [(main1[side] - main0.get(side, 0.0)) * 1e6 / res.requests for side in main1]
    out["main_thread_us_per_request"] = round(max(mains), 2) if mains else None
    return out


# ------------------------------------------------------------------------------------- variants
def scaling(labs: Labs) -> dict:
    """New connection per request with the proxies given 1 and 2 worker threads (Envoy:
    --concurrency): one fresh setup per thread count, both open at once (the idle one costs
    nothing), each warmed by a short unrecorded run, then `scaling_rounds` rounds of one
    `scaling_seconds` wrk run against each, the order flipping every round (bench.scaling: the
    figure is the median of the per-round 2 ÷ 1 ratios, min and max its spread)."""
    s = labs.settings
    short = replace(s, wrk_seconds=s.scaling_seconds)
    warm = replace(s, wrk_seconds=1.0)
    with ExitStack() as stack:
        ctxs = {str(t): stack.enter_context(labs.open(threads=t)) for t in s.scaling_threads}
        for ctx in ctxs.values():  # pools, caches and the page cache of both setups warm before any figure
            http(replace(ctx, settings=warm), True)
        rounds = []
        for threads in scaling_figure.order(s.scaling_rounds, ctxs):
            time.sleep(SCALING_PAUSE_S)  # the previous run's TIME_WAIT and close work settle first
            rounds.append({t: http(replace(ctxs[t], settings=short), True) for t in threads})
    out = scaling_figure.summarize(rounds, *ctxs)
    out["runs"] = rounds
    out["order"] = [list(rnd) for rnd in rounds]
    return out


def other_topology(labs: Labs) -> dict:
    """Throughput (1 and 4 streams) and CPU per GB again, on the other topology (a plain veth pair
    between the pods, or the bridge), on a fresh setup."""
    topo = labs.settings.second_topology
    with labs.open(topology=topo) as ctx:
        return {"topology": topo, "tput1": throughput(ctx, 1), "tput4": throughput(ctx, 4), "cpu": cpu_per_gb(ctx)}


# ---------------------------------------------------------------------------------------- tunnels
class _Lines:
    """JSON lines from a child's stdout with a deadline per line (select on the raw fd)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.fd, self.buf = proc, proc.stdout.fileno(), b""

    def next(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no report from the tunnel client within {timeout:.0f}s")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise BenchError(f"tunnel client exited ({self.proc.poll()}) without a report")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def tunnels(ctx: Ctx) -> dict:
    """Open `settings.tunnels` concurrent connections through the setup (each proven by a 1-byte
    round trip), then sample proxy RSS and sockets and count established TCP connections; prove
    they are all still alive; close them."""
    s, bl = ctx.settings, ctx.bl
    _check_alive(ctx)
    time.sleep(s.settle_seconds)
    rss_before = ctx.proxies.rss_by_side()
    argv = [sys.executable, str(TUNNELS_SCRIPT), "open", ctx.server_ip, str(HOLD_PORT), str(s.tunnels),
            "--parallel", str(s.tunnel_connect_parallel), "--timeout", "30",
            "--open-timeout", str(s.tunnel_open_timeout), "--stall", "45", "--hold", str(s.tunnel_open_timeout + 120)]
    with open(ctx.workdir / "tunnels-client.log", "ab") as err:
        proc = bl.topology.popen(bl.client.pod, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    try:
        lines = _Lines(proc)
        opened = lines.next(s.tunnel_open_timeout + 30)
        if opened.get("event") != "open":
            raise BenchError(f"unexpected report from the tunnel client: {opened}")
        if not opened["opened"]:
            raise BenchError(f"no tunnel of {s.tunnels:,} could be opened in {opened['seconds']:.0f}s: "
                             f"{opened['failures']}")
        time.sleep(s.settle_seconds)
        rss_at = ctx.proxies.rss_by_side()
        sockets = ctx.proxies.sockets_by_side()
        established = {
            "client_pod": bl.established(bl.client),
            "server_pod": bl.established(bl.server),
            "hbone": bl.established(bl.client, "dport = :15008"),
        }
        proc.stdin.write(b"check\n")
        proc.stdin.flush()
        check = lines.next(120)
        proc.stdin.write(b"close\n")
        proc.stdin.flush()
        closed = lines.next(60)
    finally:
        bl.topology.stop(proc)
    _check_alive(ctx)
    return {
        "requested": s.tunnels, "opened": opened["opened"], "open_failures": opened["failures"],
        "open_seconds": opened["seconds"], "alive": check.get("alive"), "check_failures": check.get("failures"),
        "closed": closed.get("closed"), "rss_before": rss_before, "rss_at": rss_at, "proxy_sockets": sockets,
        "established": established,
    }
