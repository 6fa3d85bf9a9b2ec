"""`python -m bench`: measure direct, ztunnel-fast native, ztunnel-fast pure and an Envoy HBONE pair
(at --concurrency 2 and 1) side by side, print the table, write JSON + Markdown + PNG to bench/results/.

Orchestration only: one setup at a time, each on a fresh two-pod topology (bench.lab); one step per
figure (bench.runners).  Steps marked `own_lab` (the worker-thread scaling and the second topology)
build their own fresh setups through `Labs`; the shared setup is torn down before them.  A failed step is recorded with its reason, the setup is rebuilt from
scratch and the step retried once; then the run goes on: a hung tunnel costs one figure at most,
never the run, and a figure obtained on the retry says so (JSON "retried", notes under the table).

Invariants: every namespace, process and rule of a setup is gone before the next setup starts
(BenchLab.teardown in `finally`), also on Ctrl-C (ztunnel_fast.netns' SIGINT/SIGTERM hooks) and on
failure; stale `ztb-` namespaces of dead earlier runs are removed at start.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from . import floor, micro, report, runners
from .settings import DEFAULT, MIB, QUICK, TOPOLOGIES, Settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_REBUILDS = 4  # failed attempts per setup; then its remaining figures are reported as not run
TOOLS = ("ip", "iptables-legacy", "ss", "sysctl", "curl", "iperf3", "wrk", "nginx")
DEFAULT_SETUPS = "direct,native,fastpath,xds,pure,envoy,envoy1,relay,relaycopy,relayaead"


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    fn: Callable  # (runners.Ctx) -> dict, or (runners.Labs) -> dict when own_lab
    summary: Callable[[dict], str]
    proxied_only: bool = False  # nothing to measure without a proxy
    own_lab: bool = False  # builds its own setups (variants): gets a Labs, not the shared Ctx
    applies: Callable[[Settings], bool] = lambda s: True


def _mib(b: float) -> str:
    return f"{b / MIB:.1f} MiB"


def _iperf_summary(r: dict) -> str:
    cpu = r.get("proxy_cpu_s_per_gb")
    return f"{r['gbps']:.2f} Gbit/s" + (f", proxy CPU {cpu:.2f} s/GB" if cpu is not None else "")


def _wrk_summary(r: dict) -> str:
    cpu = r.get("proxy_cpu_us_per_request")
    return (f"{r['rps']:,.0f} req/s, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, errors {r['errors']}"
            + (f", proxy CPU {cpu:,.0f} µs/request" if cpu is not None else ""))


def _syscalls_summary(r: dict) -> str:
    g = r["per_gb"]
    return (f"{g['total']:,.0f} syscalls/GB (read {g['read']:,.0f}, write {g['write']:,.0f}, epoll "
            f"{g['epoll']:,.0f}, other {g['other']:,.0f}) by {r['tool']}")


def _scaling_summary(r: dict) -> str:
    rates = ", ".join(f"{t} thread(s) {v['rps']:,.0f} req/s" for t, v in r["by_threads"].items() if v.get("rps"))
    if r.get("ratio_median") is None:
        return rates
    return (f"{rates} (medians of {r['rounds']} alternated rounds); 2 ÷ 1 median {r['ratio_median']:.2f} "
            f"(min {r['ratio_min']:.2f}, max {r['ratio_max']:.2f})")


def _topology_summary(r: dict) -> str:
    return (f"{r['topology']}: 1 stream {r['tput1']['gbps']:.2f} Gbit/s, 4 streams {r['tput4']['gbps']:.2f} Gbit/s"
            + (f", proxy CPU {r['cpu']['proxy_cpu_s_per_gb']:.2f} s/GB" if r["cpu"].get("proxy_cpu_s_per_gb") else ""))


def _tunnels_summary(r: dict) -> str:
    before, at = sum(r["rss_before"].values()), sum(r["rss_at"].values())
    s = f"{r['alive']:,}/{r['requested']:,} alive (opened in {r['open_seconds']:.1f} s)"
    if r["alive"] != r["requested"]:
        s += f" [only {r['alive']:,}: open failures {r['open_failures']}, check failures {r['check_failures']}]"
    if r["rss_at"]:
        per = (at - before) / max(1, r["opened"]) / 1024
        s += f", proxies {_mib(before)} -> {_mib(at)} ({per:.2f} KiB/tunnel), HBONE conns {r['established']['hbone']}"
    return s


STEPS = (
    Step("idle", "idle RSS", runners.idle_rss,
         lambda r: ", ".join(f"{k} {_mib(v)}" for k, v in r["rss"].items()) or "no proxy"),
    Step("check", "path check", runners.path_check,
         lambda r: f"HTTP {r['http_status']}, " + (f"packets through the REDIRECT rule {r['redirected_packets']}"
                                                    if "redirected_packets" in r
                                                    else f"HBONE connections {r['hbone_connections']}")),
    Step("tput1", "throughput, 1 stream", lambda c: runners.throughput(c, 1), _iperf_summary),
    Step("tput4", "throughput, 4 streams", lambda c: runners.throughput(c, 4), _iperf_summary),
    Step("cpu", "CPU per GB (fixed-size transfer)", runners.cpu_per_gb, _iperf_summary),
    Step("syscalls", "syscalls per GB (separate transfer, counted)", runners.syscalls, _syscalls_summary,
         proxied_only=True),
    Step("http_ka", "HTTP keep-alive", lambda c: runners.http(c, False), _wrk_summary),
    Step("http_nc", "HTTP new connection per request", lambda c: runners.http(c, True), _wrk_summary),
    Step("tunnels", "concurrent tunnels", runners.tunnels, _tunnels_summary),
    Step("scaling", "new connection per request at 1 and 2 worker threads, alternated rounds", runners.scaling, _scaling_summary,
         proxied_only=True, own_lab=True),
    Step("topology2", "throughput and CPU per GB on the second topology", runners.other_topology,
         _topology_summary, own_lab=True, applies=lambda s: bool(s.second_topology)),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Measure direct (no proxy), ztunnel-fast native, ztunnel-fast pure twin and an Envoy HBONE pair "
            "side by side, in network namespaces (198.18.0.0/15) on this machine: iperf3 throughput (1 and 4 "
            "streams), proxy CPU seconds per GB, proxy syscalls per GB by type, HTTP request rate and p50/p99 "
            "latency with keep-alive and with a new connection per request (wrk -> nginx) with proxy CPU per new "
            "connection, the new-connection rate at 1 and 2 worker threads, idle RSS, RSS and connections with "
            "many open tunnels; throughput and CPU/GB also on a plain veth pair. Envoy runs at --concurrency 2 "
            "(envoy) and 1 (envoy1). Prints a table with ratios vs direct and vs Envoy; writes "
            "bench/results/<UTC>.json/.md/.png and latest.*. Needs root. Default run ~15 minutes, --quick ~5."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short durations, 2,000 tunnels (~5 minutes)")
    p.add_argument("--setups", default=DEFAULT_SETUPS,
                   help="comma-separated subset of direct,native,fastpath,xds,pure,envoy,envoy1,relay,relaycopy,relayaead, run in "
                        "the order given (xds: native in xDS mode against the fake istiod, idle RSS only; relay, relaycopy: plain TCP relay pairs, the CPU floor; with them the table "
                        "adds floor = relay CPU/GB + AES-128-GCM encrypt + decrypt per GB; relayaead: a C relay pair "
                        "with AES-128-GCM records between the relays, the floor measured in place)")
    p.add_argument("--topology", choices=("both",) + TOPOLOGIES, default="both",
                   help="bridge: pods on a bridge (every figure); veth: one veth pair between the pods (every "
                        "figure); both: every figure on the bridge, throughput and CPU/GB also on the veth pair")
    p.add_argument("--worker-threads", type=int, default=DEFAULT.worker_threads,
                   help="ZTUNNEL_WORKER_THREADS of ztunnel-fast (the scaling figure always uses 1 and 2)")
    p.add_argument("--syscall-tool", choices=("auto", "perf", "strace"), default=DEFAULT.syscall_tool,
                   help="how syscalls are counted: perf stat on syscall tracepoints, strace -c -f, or perf when "
                        "it works here")
    p.add_argument("--syscall-mib", type=int, help="override: MiB of the syscall-counted transfer")
    p.add_argument("--skip", default="", help="comma-separated step keys not to run (idle, check, tput1, tput4, cpu, "
                                              "syscalls, http_ka, http_nc, tunnels, scaling, topology2)")
    p.add_argument("--profile", action="store_true",
                   help="also record flame graphs during extra 1-stream iperf3 runs: perf (every thread, C and "
                        "kernel frames, native worker threads apart) of every proxy, and py-spy (--native) of the "
                        "ztunnel-fast processes; SVGs go to the results directory")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--iperf-seconds", type=float, help="override: seconds per throughput run")
    p.add_argument("--wrk-seconds", type=float, help="override: seconds per HTTP run")
    p.add_argument("--wrk-connections", type=int, help="override: wrk connections")
    p.add_argument("--scaling-rounds", type=int, help="override: alternated rounds of the scaling figure")
    p.add_argument("--scaling-seconds", type=float, help="override: seconds per wrk run of the scaling figure")
    p.add_argument("--cpu-mib", type=int, help="override: MiB of the fixed-size CPU run")
    p.add_argument("--tunnels", type=int, help="override: concurrent tunnels")
    p.add_argument("--micro-only", action="store_true", help="run only the in-process micro-benchmarks (bench.micro)")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs of the proxies and apps")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="measure nothing: print the table of a results JSON and rewrite its .md and .png")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else DEFAULT
    over = {
        "iperf_seconds": args.iperf_seconds, "wrk_seconds": args.wrk_seconds, "wrk_connections": args.wrk_connections,
        "scaling_rounds": args.scaling_rounds, "scaling_seconds": args.scaling_seconds,
        "cpu_bytes": args.cpu_mib * MIB if args.cpu_mib else None, "tunnels": args.tunnels,
        "syscall_bytes": args.syscall_mib * MIB if args.syscall_mib else None,
        "syscall_tool": args.syscall_tool, "worker_threads": args.worker_threads,
        "topology": "bridge" if args.topology == "both" else args.topology,
    }
    s = dataclasses.replace(s, **{k: v for k, v in over.items() if v is not None})
    return dataclasses.replace(s, second_topology="veth" if args.topology == "both" else None)


def preflight(setup_names: list[str], profile: bool) -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, iptables)")
    problems += [f"{t} not found" for t in TOOLS if not shutil.which(t)]
    if "envoy" in setup_names:
        try:
            from tests.interop.envoy import envoy_binary

            envoy_binary()
        except (ImportError, FileNotFoundError) as exc:
            problems.append(f"envoy: {exc}")
    for mod in ("rich", "matplotlib"):
        try:
            __import__(mod)
        except ImportError:
            problems.append(f"python package {mod} missing (pip install '.[bench]')")
    if profile:
        from .flame import perf_binary
        from .profiling import py_spy_binary

        if py_spy_binary() is None:
            problems.append("py-spy not found (pip install '.[bench]')")
        if perf_binary() is None:
            problems.append("perf not found (apt: linux-perf)")
    return problems


def raise_nofile() -> int:
    """10,000 tunnels need ~10k descriptors in each proxy, the opener and the holder: raise the soft
    limit to the hard one (children inherit it).  Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def print_table(console, doc: dict) -> None:
    """The table (split in two when the terminal is too narrow), then the notes and micro figures."""
    from rich.markup import escape

    header, rows = report.table(doc)
    console.print()
    parts = [(header, rows)] if report.rich_width(header, rows) <= console.width else report.split(header, rows)
    for i, (h, r) in enumerate(parts):
        console.print(report.render_rich(h, r, report.title_of(doc) if i == 0 else "", ""))
    for note in report.notes(doc):
        style = "red" if " failed: " in note or "not measured" in note or "only " in note else "dim"
        console.print(f"[{style}]•[/] " + escape(note), highlight=False)
    for m in (doc.get("micro") or {}).values():
        console.print(escape(f"micro {m['label']}: {m.get('value', m.get('error'))} {m['unit']}"))


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _netns_names() -> list[str]:
    cp = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


class Runner:
    """Runs every step of every setup, recording into `doc`."""

    def __init__(self, doc: dict, settings: Settings, workroot: Path, run_id: str, progress, task, console,
                 profile: bool, results_dir: Path, stamp: str, skip: frozenset = frozenset()):
        self.doc, self.settings, self.workroot, self.run_id = doc, settings, workroot, run_id
        self.progress, self.task, self.console = progress, task, console
        self.profile, self.results_dir, self.stamp = profile, results_dir, stamp
        self.skip = skip
        self.live: list = []  # the live BenchLabs (the scaling step keeps two), for teardown on interruption
        self.labs_built = 0  # names of the variant labs: unique within the run

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def teardown(self, bl=None) -> None:
        """Tear down `bl`, or every live lab when None."""
        for lab in ([bl] if bl is not None else list(self.live)):
            if lab in self.live:
                self.live.remove(lab)
                lab.teardown()

    def _build(self, setup, attempt: int | str, threads: int | None = None, topology: str | None = None):
        from .lab import BenchLab

        workdir = self.workroot / f"{setup.name}-{attempt}"
        workdir.mkdir(parents=True, exist_ok=True)
        name = setup.name if attempt == 0 else f"{setup.name}-r{attempt}" if isinstance(attempt, int) \
            else f"{setup.name}-{attempt}"
        bl = BenchLab(workdir, name, self.run_id, self.settings.body_bytes,
                      topology=topology or self.settings.topology)
        self.live.append(bl)
        started = setup.start(bl, threads)
        return bl, started, runners.Ctx(bl, started.proxies, self.settings, workdir,
                                        pooled=started.info.get("pooled", True))

    def steps_for(self, setup) -> list[Step]:
        return [st for st in STEPS if st.key not in self.skip and st.key not in setup.skip
                and st.applies(self.settings) and (setup.proxied or not st.proxied_only)
                and (st.key != "scaling" or setup.scales)]

    def run_setup(self, setup) -> None:
        rec = self.doc["setups"][setup.name] = {
            "label": setup.label, "available": True, "reason": None, "info": {}, "raw": {}, "errors": {},
            "retried": {}, "rebuilds": 0, "seconds": None,
        }
        t0 = time.monotonic()
        ok, why = setup.available()
        if not ok:
            rec.update(available=False, reason=why)
            self.say(f"[yellow]{_esc(setup.label)}: not measured: {_esc(why)}[/]")
            self.progress.advance(self.task, len(STEPS))
            return
        steps = self.steps_for(setup)
        self.progress.advance(self.task, len(STEPS) - len(steps))
        self.say(f"[bold]{_esc(setup.label)}[/]")
        ctx = None
        fresh = False
        give_up = None  # once set, the remaining steps are recorded as not run, with this reason
        try:
            for step in steps:
                self.progress.update(self.task, description=f"{setup.name}: {step.title}")
                if step.own_lab and ctx is not None:
                    self.teardown()  # variants build their own setups, one at a time
                    ctx = None
                for attempt in (1, 2):  # a failed figure is retried once, on a fresh setup
                    if ctx is None and give_up is None and not step.own_lab:
                        try:
                            _, started, ctx = self._build(setup, rec["rebuilds"])
                            rec["info"] = started.info
                            fresh = True
                        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                            self.teardown()
                            give_up = f"setup did not start: {type(exc).__name__}: {str(exc)[-800:]}"
                            self.say(f"  [red]✗[/] {_esc(give_up)}")
                    if give_up is not None:
                        first = rec["retried"].get(step.key)
                        rec["errors"][step.key] = f"{first}; no retry: {give_up}" if first else f"not run: {give_up}"
                        break
                    t = time.monotonic()
                    try:
                        if step.own_lab:
                            result = step.fn(_Labs(self, setup, rec))
                        else:
                            if fresh and rec["rebuilds"] and step.key != "check":
                                runners.path_check(ctx)  # a rebuilt setup must carry traffic before it is measured
                            fresh = False
                            result = step.fn(ctx)
                        rec["raw"][step.key] = result
                        again = " [yellow](retry)[/]" if attempt > 1 else ""
                        self.say(f"  [green]✓[/] {step.title}{again}: {_esc(step.summary(result))}  "
                                 f"[dim]({time.monotonic() - t:.0f} s)[/]")
                        break
                    except Exception as exc:  # noqa: BLE001 - one failed figure must not hide the others
                        msg = str(exc) if isinstance(exc, runners.BenchError) else f"{type(exc).__name__}: {exc}"
                        msg = msg[-1000:]
                    self.teardown()  # fresh topology, apps and proxies for the retry / the next figure
                    ctx = None
                    rec["rebuilds"] += 1
                    if rec["rebuilds"] > MAX_REBUILDS:
                        give_up = f"gave up after {MAX_REBUILDS} failed attempts"
                    if attempt == 1 and give_up is None:
                        rec["retried"][step.key] = msg
                        self.say(f"  [red]✗[/] {step.title}: {_esc(msg[-300:])}  [dim]({time.monotonic() - t:.0f} s)"
                                 "; retrying on a fresh setup[/]")
                        continue
                    first = rec["retried"].get(step.key)
                    rec["errors"][step.key] = f"{msg} (first attempt: {first})" if attempt > 1 else msg
                    self.say(f"  [red]✗[/] {step.title}: {_esc(msg[-300:])}  [dim]({time.monotonic() - t:.0f} s)[/]")
                    break
                self.progress.advance(self.task)
            if self.profile and setup.proxied and give_up is None:
                self.progress.update(self.task, description=f"{setup.name}: flame graphs")
                if ctx is None:
                    try:
                        _, started, ctx = self._build(setup, "profile")
                    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                        self.teardown()
                        rec["profile"] = {"error": f"setup did not start: {exc}"}
                if ctx is not None:
                    rec["profile"] = self._profile(setup, ctx)
        finally:
            self.teardown()
            rec["seconds"] = round(time.monotonic() - t0, 1)

    def _profile(self, setup, ctx: runners.Ctx) -> dict:
        """perf flame graphs (every proxy; native worker threads apart), then py-spy (ztunnel-fast
        only), each during an extra 1-stream iperf3 run of its own: never during a timed figure."""
        from . import flame
        from .profiling import Recorder

        s = self.settings
        seconds = s.iperf_seconds + s.iperf_omit
        out: dict = {}
        recorders = [("perf", lambda: flame.Recorder(ctx.proxies, self.results_dir / f"{self.stamp}-{setup.name}-perf",
                                                     seconds))]
        if setup.name in ("native", "pure", "fastpath"):
            recorders.append(("py-spy", lambda: Recorder(ctx.proxies, self.results_dir / f"{self.stamp}-{setup.name}",
                                                         seconds)))
        for tool, make in recorders:
            try:
                rec = make()
            except Exception as exc:  # noqa: BLE001
                out[tool] = {"error": str(exc)}
                continue
            try:
                result = runners.throughput(ctx, 1)
            except Exception as exc:  # noqa: BLE001
                result = {"error": str(exc)}
            finally:
                files = rec.finish()
                rec.abort()
            for side, f in files.items():
                shown = f.get("svg", f) if isinstance(f, dict) else f
                extra = f" (+ {f['workers_svg']})" if isinstance(f, dict) and f.get("workers_svg") else ""
                self.say(f"  [green]✓[/] {tool} {side}: {_esc(str(shown))}{_esc(extra)}")
            out[tool] = {"flamegraphs": files, "profiled_run": result}
        return out


class _Labs:
    """runners.Labs for the variant steps: fresh setups of one Setup with other worker threads or
    another topology, each checked before it is measured and torn down when its `open` exits (the
    scaling step holds two open at once, to alternate between them)."""

    def __init__(self, runner: Runner, setup, rec: dict):
        self.runner, self.setup, self.rec = runner, setup, rec
        self.settings = runner.settings

    @contextmanager
    def open(self, threads: int | None = None, topology: str | None = None):
        self.runner.labs_built += 1
        tag = f"v{self.runner.labs_built}"
        before = list(self.runner.live)
        try:
            _, started, ctx = self.runner._build(self.setup, tag, threads=threads, topology=topology)
            self.rec.setdefault("variants", {})[tag] = {"threads": threads, "topology": topology or
                                                        self.settings.topology, "info": started.info}
            runners.path_check(ctx)
            yield ctx
        finally:
            for bl in [bl for bl in self.runner.live if bl not in before]:  # this one's lab only (two may be open)
                self.runner.teardown(bl)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ztunnel_fast import netns

    from . import setups as setups_mod
    from .lab import PREFIX
    from .machine import machine_info, versions

    console = Console()
    if args.render:
        import json

        doc = json.loads(args.render.read_text())
        print_table(console, doc)
        stamp = args.render.stem
        latest = (args.render.parent / "latest.json").exists() and json.loads(
            (args.render.parent / "latest.json").read_text()).get("started") == doc.get("started")
        report.write_results(doc, args.render.parent, stamp, latest=latest)
        png = report.chart(doc, args.render.with_suffix(".png"), report.title_of(doc))
        if latest:
            shutil.copyfile(png, args.render.parent / "latest.png")
        console.print(f"rewrote {args.render.with_suffix('.md')}, {png}" + (" (and latest.*)" if latest else ""))
        return 0
    if args.micro_only:
        doc = {"micro": micro.run_all(args.quick)}
        console.print(doc["micro"] or "no micro-benchmarks registered yet (see bench/micro.py)")
        return 0
    names = [n.strip() for n in args.setups.split(",") if n.strip()]
    skip = frozenset(k.strip() for k in args.skip.split(",") if k.strip())
    unknown_steps = skip - {st.key for st in STEPS}
    if unknown_steps:
        console.print(f"[red]error:[/] unknown step(s) in --skip: {', '.join(sorted(unknown_steps))}")
        return 2
    try:
        setups = setups_mod.make(names, args.worker_threads)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    problems = preflight(names, args.profile)
    if problems:
        console.print("[red]cannot run the bench:[/] " + "; ".join(problems) + "\n(`make bench` installs everything)")
        return 2
    settings = settings_from(args)
    nofile = raise_nofile()
    stale = netns.cleanup_stale(PREFIX)
    if stale:
        console.print(f"removed stale namespaces of earlier runs: {' '.join(stale)}")

    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    envoy = None
    if "envoy" in names:
        from tests.interop.envoy import envoy_binary

        envoy = envoy_binary()
    doc = {
        "schema": "ztunnel-fast-bench/1",
        "started": now.isoformat(),
        "finished": None,
        "quick": args.quick,
        "profile": args.profile,
        "machine": machine_info(),
        "versions": versions(envoy),
        "settings": {**settings.as_dict(), "nofile_limit": nofile, "skipped_steps": sorted(skip)},
        "setups": {},
        "micro": {},
    }
    mi = doc["machine"]
    console.print(f"[bold]ztunnel-fast bench[/] {stamp}: {mi['cpu_model']} × {mi['nproc']}, Linux {mi['kernel']}; "
                  f"setups {', '.join(names)}; {'quick' if args.quick else 'full'} run; ztunnel-fast from "
                  f"{doc['versions']['ztunnel_fast_path']} (native engine {escape(doc['versions']['native_engine'])})")
    if nofile < settings.tunnels + 1000:  # per process: each proxy, the opener and the holder
        console.print(f"[yellow]warning: open-file limit {nofile} may be too low for {settings.tunnels:,} tunnels[/]")
    if args.profile:
        args.results_dir.mkdir(parents=True, exist_ok=True)

    run_id = secrets.token_hex(3)  # namespaces: ztb-<run_id>-<setup>-{client,server,net}
    workroot = Path(tempfile.mkdtemp(prefix="ztunnel-fast-bench-"))
    interrupted = False
    runner = None
    t0 = time.monotonic()
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("starting", total=len(STEPS) * len(setups))
            runner = Runner(doc, settings, workroot, run_id, progress, task, progress.console,
                            args.profile, args.results_dir, stamp, skip)
            for setup in setups:
                runner.run_setup(setup)
        if any(name in floor.DERIVED.values() for name in names):
            console.print("measuring AES-GCM encrypt + decrypt per GB on this CPU (the floor's crypto share)")
            doc["crypto"] = floor.measure_crypto((64 if args.quick else 256) * MIB)
        doc["micro"] = micro.run_all(args.quick)
    except KeyboardInterrupt:
        interrupted = True
        console.print("[red]interrupted[/]: everything torn down; partial results follow")
    finally:
        if runner is not None:
            runner.teardown()
        if args.keep_workdir:
            console.print(f"configs and logs kept in {workroot}")
        else:
            shutil.rmtree(workroot, ignore_errors=True)

    doc["finished"] = datetime.now(timezone.utc).isoformat()
    doc["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["duration_s"] = round(time.monotonic() - t0, 1)
    doc["interrupted"] = interrupted
    for name, rec in doc["setups"].items():
        rec["metrics"] = report.metrics_from_raw(rec["raw"], proxied=name != "direct")
    doc["setups"].update(floor.derived_setups(doc["setups"], doc.get("crypto")))  # floor = relay + crypto
    doc["ratios"] = report.ratios({n: r["metrics"] for n, r in doc["setups"].items()})
    doc["configuration"] = report.configuration(doc)

    print_table(console, doc)
    if interrupted:
        stamp += "-interrupted"
    paths = report.write_results(doc, args.results_dir, stamp, latest=not interrupted)  # partial: never "latest"
    png = args.results_dir / f"{stamp}.png"
    try:
        report.chart(doc, png, report.title_of(doc))
        if not interrupted:
            shutil.copyfile(png, args.results_dir / "latest.png")
        console.print(f"results: {paths['json']}, {paths['md']}, {png}" + ("" if interrupted else " (and latest.*)"))
    except Exception as exc:  # noqa: BLE001 - the table and JSON are already out
        console.print(f"[yellow]chart not written: {escape(str(exc))}[/]; results: {paths['json']}")
    leftovers = [ns for ns in _netns_names() if ns.startswith(f"{PREFIX}{run_id}-")]
    if leftovers:
        console.print(f"[red]namespaces left behind: {' '.join(leftovers)}[/]")
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
