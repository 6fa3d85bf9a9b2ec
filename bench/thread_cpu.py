"""`python -m bench.thread_cpu`: where the proxies' CPU goes, thread by thread, during the
new-connection run at 1 and at 2 worker threads (a bench tool for issue 11's scaling question, not
a test).

  .venv/bin/python -m bench.thread_cpu --setup fastpath --threads 1,2 --seconds 5 [--rounds 2]

Per thread count (alternated over --rounds, the order flipping as in the scaling figure): a fresh
setup on a fresh two-pod topology (BenchLab, as the bench builds it), the path checked, a 1 s
unrecorded warm-up, then one wrk run with `Connection: close` (runners.http) with every thread of
both proxies read from /proc/<pid>/task/<tid>/ before and after: CPU time and run-queue wait from
`schedstat` (ns; the wait is time runnable but not running: the machine's 2 cores were busy),
voluntary and involuntary context switches from `status` (voluntary ones are sleeps: epoll waits,
futex waits on a contended lock).  Printed per side: the main thread (the event loop for
ztunnel-fast; Envoy's main thread) and the others by CPU, as CPU-seconds per second of the run
(1.0 = one core busy all the time) and µs per request.  A thread near 1.0 while the others idle is
what serialises the workers.

Invariants: the tool only reads /proc and runs what the bench runs; every topology is torn down
(BenchLab.teardown in `finally`); bounded by --rounds and --seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .procstat import parse_schedstat

PROC = Path("/proc")


@dataclass(frozen=True)
class ThreadSample:
    comm: str
    cpu_ns: int  # schedstat field 1: time on a CPU
    wait_ns: int  # schedstat field 2: time runnable, waiting for a CPU
    voluntary: int  # voluntary_ctxt_switches (sleeps)
    involuntary: int  # nonvoluntary_ctxt_switches (preempted)


def parse_status_switches(text: str) -> tuple[int, int]:
    """(voluntary, involuntary) context switches from a /proc/.../status text (0 when absent)."""
    vol = invol = 0
    for line in text.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            vol = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            invol = int(line.split()[1])
    return vol, invol


def sample(pids: list[int]) -> dict[int, ThreadSample]:
    """Every thread of these processes now; a thread that vanished in between is left out."""
    out = {}
    tids = []
    for pid in pids:
        try:
            tids += [(pid, int(t)) for t in os.listdir(PROC / str(pid) / "task")]
        except OSError:
            continue
    for pid, tid in tids:
        base = PROC / str(pid) / "task" / str(tid)
        try:
            comm = (base / "comm").read_text().strip()
            cpu, wait = parse_schedstat((base / "schedstat").read_text())
            vol, invol = parse_status_switches((base / "status").read_text())
        except (OSError, ValueError, IndexError):
            continue
        out[tid] = ThreadSample(comm, cpu, wait, vol, invol)
    return out


def diff(mains: set[int], before: dict[int, ThreadSample], after: dict[int, ThreadSample], seconds: float,
         requests: int) -> list[dict]:
    """Per thread present at the end: what it did between the samples (pure).  The main threads
    (tid in `mains`: a process's pid) first, then the others by CPU; threads that used no CPU are left out."""
    rows = []
    for tid, a in after.items():
        b = before.get(tid, ThreadSample(a.comm, 0, 0, 0, 0))
        cpu = (a.cpu_ns - b.cpu_ns) / 1e9
        if cpu <= 0 and tid not in mains:
            continue
        rows.append({"tid": tid, "main": tid in mains, "comm": a.comm, "cpu_s": round(cpu, 4),
                     "cores": round(cpu / seconds, 3) if seconds else None,
                     "wait_s": round((a.wait_ns - b.wait_ns) / 1e9, 4),
                     "us_per_request": round(cpu * 1e6 / requests, 1) if requests else None,
                     "voluntary": a.voluntary - b.voluntary, "involuntary": a.involuntary - b.involuntary})
    rows.sort(key=lambda r: (not r["main"], -r["cpu_s"]))
    return rows


def _show(side: str, rows: list[dict]) -> str:
    lines = [f"  {side}: " + ", ".join(
        f"{'main' if r['main'] else r['comm']}[{r['tid']}] {r['cores']:.2f} cores ({r['us_per_request']:.0f} µs/req, "
        f"waited {r['wait_s']:.2f} s, {r['voluntary']} sleeps, {r['involuntary']} preempted)" for r in rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ztunnel_fast import netns

    from . import runners
    from . import scaling as scaling_figure
    from . import setups as setups_mod
    from .lab import PREFIX, BenchLab
    from .settings import DEFAULT

    ap = argparse.ArgumentParser(prog="python -m bench.thread_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", default="fastpath", help="a setup of bench.setups.ALL with worker threads")
    ap.add_argument("--threads", default="1,2", help="comma-separated worker thread counts")
    ap.add_argument("--seconds", type=float, default=5.0, help="wrk seconds per run (whole)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="more environment for both ztunnel-fast proxies (e.g. POOL_MAX_STREAMS_PER_CONNECTION=4)")
    ap.add_argument("--json", type=Path, help="write every run's per-thread rows here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("must run as root (network namespaces, iptables)", file=sys.stderr)
        return 2
    setup = setups_mod.make([args.setup])[0]
    if not setup.scales:
        print(f"{args.setup} has no worker threads to vary", file=sys.stderr)
        return 2
    if args.env:
        if not hasattr(setup, "extra_env"):
            print("--env applies to ztunnel-fast setups only", file=sys.stderr)
            return 2
        setup.extra_env = dict(kv.split("=", 1) for kv in args.env)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    settings = replace(DEFAULT, wrk_seconds=args.seconds, settle_seconds=1.0)
    netns.cleanup_stale(PREFIX)
    run_id = secrets.token_hex(3)
    workroot = Path(tempfile.mkdtemp(prefix="ztunnel-fast-threadcpu-"))
    runs = []
    try:
        for rnd, order in enumerate(scaling_figure.order(args.rounds, threads)):
            for t in order:
                workdir = workroot / f"{rnd}-{t}"
                workdir.mkdir(parents=True)
                bl = BenchLab(workdir, f"tc{t}", run_id, settings.body_bytes)
                try:
                    started = setup.start(bl, t)
                    ctx = runners.Ctx(bl, started.proxies, settings, workdir)
                    runners.path_check(ctx)
                    runners.http(replace(ctx, settings=replace(settings, wrk_seconds=1.0)), True)  # warm-up
                    pids = {side: started.proxies.tree(side) for side in started.proxies.pids}
                    before = {side: sample(tree) for side, tree in pids.items()}
                    t0 = time.monotonic()
                    res = runners.http(ctx, True)
                    wall = time.monotonic() - t0
                    after = {side: sample(tree) for side, tree in pids.items()}
                finally:
                    bl.teardown()
                per_side = {side: diff(set(tree), before[side], after[side], wall, res["requests"])
                            for side, tree in pids.items()}
                runs.append({"round": rnd, "threads": t, "rps": res["rps"], "requests": res["requests"],
                             "seconds": round(wall, 2), "threads_cpu": per_side})
                print(f"round {rnd + 1}, {t} worker thread(s): {res['rps']:,.0f} req/s, proxy CPU "
                      f"{res['proxy_cpu_us_per_request']:,.0f} µs/req", flush=True)
                for side, rows in per_side.items():
                    print(_show(side, rows), flush=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
