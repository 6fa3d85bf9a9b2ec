"""Soak and fault run (`make soak`, `python -m bench.soak --minutes N`): a bench, not a test.

One client pod and one server pod (bench.lab.BenchLab), a ztunnel-fast in each (the client's
outbound REDIRECTed to it, HBONE to the server's), and for the whole run:
(with --inpod the client's ztunnel-fast is instead a node's, in in-pod mode: istio-cni's double
(fakes/cni.FakeCni) hands it the client pod, whose in-pod rules send its outbound to the pod's own
15001, which that ztunnel-fast serves from inside the pod; the server side stays dedicated)

  traffic   long echo transfers (32 MiB, paced), batches of short echo connections, 1,000 held
            tunnels (bench/tunnels.py, each checked by a 1-byte round trip at every sample), and
            an app that resets every connection it accepts; every echo is checked by sha256
  churn     the LOCAL_XDS_PATH file rewritten atomically every few seconds (a policy added or
            removed, a workload added or removed), certificates issued with a short SECRET_TTL
            (renewed at half-life, so several rotations per run)
  faults    after the warm-up, one each: the peer (server-side) ztunnel-fast SIGKILLed mid-transfer
            and restarted; the peer blackholed (iptables DROP on 15008 inside its netns) until the
            client's PING timeout closes the connection; the peer SIGSTOPped then SIGCONTed; the
            local config truncated mid-write (must be ignored, last good state kept)

Samples every --interval seconds: RSS and open descriptors of both ztunnel-fast processes, held
tunnels alive, HBONE connections of the client pod, cumulative errors, hash mismatches, crashes.
At the end both proxies are drained (SIGTERM) with their fast-path loggers raised to info for the
drain lines only: with the fast paths on (the default; --no-fast-path turns them off) on the native engine, the report says how many connections the client's
workers carried (outbound fast path) and how many CONNECTs the server's workers answered (inbound
fast path), and a run where either is zero misses its target.  The proxies' WARN/ERROR lines are
counted by message.
Writes bench/results/soak-<time>.md (tables: targets, faults, time series) and .png, and prints
the markdown.

Invariants: every namespace, process and iptables rule the run makes lives in its BenchLab
topology (rules live inside the pods' namespaces) and is removed by its teardown, which runs on
normal exit, on failure and on Ctrl-C/SIGTERM (netns installs the signal handlers); a stopped
process is SIGCONTed before teardown.  Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from ztunnel_fast import netns

from . import procstat
from .lab import HOLD_PORT, TUNNELS_SCRIPT, BenchLab
from .machine import machine_info, versions
from .setups import ZtunnelFast

NODE = "soak-node1"  # --inpod: the node namespace running the client side's ztunnel-fast

ECHO_PORT = 9000
RESET_PORT = 9001
MIB = 1 << 20
LONG_BYTES = 32 * MIB  # one long transfer: ~several seconds paced, so faults land mid-transfer
LONG_CHUNK_DELAY = 0.02  # seconds after each 256 KiB sent (keeps a transfer in flight ~2.5 s+)
SHORT_COUNT, SHORT_CONCURRENCY, SHORT_BYTES = 100, 8, 4096  # one batch of short connections
RESULTS = Path(__file__).with_name("results")
# ztunnel-fast's per-connection info lines would grow its log by ~100 MB per 30 min; the soak
# keeps warnings and the lines it reads (start-up, config reload/ignore, cert manager).
LOG_LEVEL = "warn,ztunnel_fast::app=info"
PING_TIMEOUT_S = 20.0  # ztunnel's HTTP/2 keepalive timeout: the blackhole must close within it (+ interval)
BLACKHOLE_BOUND_S = 45.0  # give up waiting for the close after this long (reported as not closed)
SIGSTOP_S = 12.0  # the peer stays stopped this long (under the PING timeout)
TRUNCATE_OBSERVE_S = 4.0  # the watcher polls every second; observe a few polls
# At the end, the drain lines of both fast paths (logged at info by the proxy loggers).
DRAIN_LOG_LEVEL = LOG_LEVEL + ",ztunnel_fast::proxy::outbound=info,ztunnel_fast::proxy::inbound=info"
OUTBOUND_STATS = re.compile(r"fast path: (\d+) connections carried by the workers, (\d+) by the event loop's path, "
                            r"(\d+) flushes")
INBOUND_STATS = re.compile(r"inbound fast path: (\d+) CONNECTs answered by the workers, (\d+) handed back, (\d+) flushes")
LOG_PROBLEM = re.compile(r"^\S+\s+(WARN|ERROR)\s+(.*)$")


def _now() -> float:
    return time.monotonic()


@dataclass
class Stats:
    """Cumulative outcome counters, written by the traffic threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict = field(default_factory=lambda: {
        "long_ok": 0, "long_err": 0, "short_ok": 0, "short_err": 0, "reset_seen": 0, "reset_missed": 0,
        "mismatches": 0, "runner_errors": 0})
    events: list = field(default_factory=list)  # (t, kind, ok, detail)
    error_kinds: dict = field(default_factory=dict)  # "kind: first error text" -> how many results

    def add(self, t: float, kind: str, ok: int, err: int, mismatches: int = 0, detail: str = "") -> None:
        with self.lock:
            if kind == "reset":
                self.counts["reset_seen"] += ok
                self.counts["reset_missed"] += err
            else:
                self.counts[f"{kind}_ok"] += ok
                self.counts[f"{kind}_err"] += err
            self.counts["mismatches"] += mismatches
            self.events.append((t, kind, ok, err, detail))
            if detail:
                key = f"{kind}: {detail.split('; ')[0][:160]}"
                self.error_kinds[key] = self.error_kinds.get(key, 0) + 1

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.counts)

    def first_after(self, t0: float, kind: str, want_ok: bool) -> float | None:
        found = self.first_event_after(t0, kind, want_ok)
        return found[0] if found else None

    def first_event_after(self, t0: float, kind: str, want_ok: bool) -> tuple[float, str] | None:
        """(time, error text) of the first result of `kind` at or after t0 that succeeded
        (want_ok) or failed."""
        with self.lock:
            for t, k, ok, err, detail in self.events:
                if t >= t0 and k == kind and ((ok > 0 and err == 0) if want_ok else err > 0):
                    return t, detail
        return None


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.stop_traffic = threading.Event()
        self.stats = Stats()
        self.samples: list[dict] = []
        self.faults: list[dict] = []
        self.crashes: list[str] = []
        self.config_writes = 0
        self.config_lock = threading.Lock()
        self.expected_down = False  # the server ztunnel is down on purpose (SIGKILL fault)
        self.stopped_pid: int | None = None
        self.holder: subprocess.Popen | None = None
        self.holder_lines: queue.Queue = queue.Queue()
        self.held_alive = 0
        self.holder_restarts = 0
        self.t0 = _now()
        self.bl: BenchLab | None = None
        # filled by finish(): {"outbound": (carried, event loop, flushes), "inbound": (answered,
        # handed back, flushes)}, a None value where the drain line is missing (fast path off)
        self.fast: dict[str, tuple | None] = {}
        self.log_problems: dict[str, int] = {}  # "LEVEL side: message" -> how many lines
        self.env = {"ZTUNNEL_ENGINE": args.engine, "RUST_LOG": LOG_LEVEL, "SECRET_TTL": args.secret_ttl,
                    "ZTUNNEL_FAST_PATH": "true" if args.fast_path else "false"}
        # --inpod: the node namespace the client side's ztunnel-fast runs in, and istio-cni's double
        self.node = None
        self.cni = None
        self.cni_dir: Path | None = None

    # -- set-up ------------------------------------------------------------------------------
    def start(self) -> None:
        ok, why = ZtunnelFast(self.args.engine).available()
        if not ok:
            raise SystemExit(f"soak: {why}")
        run_id = os.urandom(2).hex()
        self.bl = bl = BenchLab(self.workdir, "soak", run_id, body_bytes=1024, apps=("holder",))
        for port, mode in ((ECHO_PORT, "echo"), (RESET_PORT, "reset")):
            bl.apps[mode] = bl.popen(bl.server, [sys.executable, "-m", "ztunnel_fast.demo.apps", "serve", str(port), mode],
                                     f"app-{mode}.log")
            netns.wait_listening(bl.server.pod, port, timeout=15)
        self.write_config(0)
        self.server = bl.lab.start_ztunnel(bl.server, redirect=False, **self.env)
        if self.args.inpod:
            from ztunnel_fast.fakes.cni import FakeCni, install_inpod_rules

            self.node = bl.lab.pod(NODE, node=bl.client.node, workload=False)
            install_inpod_rules(bl.client.pod.netns)  # lives in the pod's netns: gone with it
            self.cni_dir = Path(tempfile.mkdtemp(prefix="ztf-soak-cni-"))  # AF_UNIX paths are short
            self.cni = FakeCni(self.cni_dir / "ztunnel.sock")
            self.client = self.start_inpod_client(wait=True)
        else:
            self.client = bl.lab.start_ztunnel(bl.client, redirect=True, **self.env)
        self.start_holder()

    def client_host(self):
        """The pod whose namespace runs the client side's ztunnel-fast (its admin, its log)."""
        return self.node if self.node is not None else self.bl.client

    def start_inpod_client(self, wait: bool):
        """The node's ztunnel-fast in in-pod mode; istio-cni's double hands it the client pod (again,
        after a restart) and sends the snapshot; returns once the pod's 15001 listens."""
        bl = self.bl
        zt = bl.lab.start_ztunnel(self.node, redirect=False, wait=wait, shared=True, INPOD_ENABLED="true",
                                  INPOD_UDS=str(self.cni.path), **self.env)
        self.cni.disconnect()  # the previous instance's connection, if any
        self.cni.accept()
        c = bl.client
        for what, error in (("add", self.cni.add(f"Kubernetes//Pod/{c.namespace}/{c.name}", c.pod.netns, c.name,
                                                 c.namespace, c.service_account)),
                            ("snapshot", self.cni.snapshot_sent())):
            if error:
                raise RuntimeError(f"in-pod client: istio-cni's {what} was refused: {error}")
        netns.wait_listening(c.pod, 15001, timeout=30)
        return zt

    def start_holder(self) -> None:
        bl = self.bl
        if self.holder is not None:
            self._close_holder()
        argv = [sys.executable, str(TUNNELS_SCRIPT), "open", bl.server.ip, str(HOLD_PORT), str(self.args.held),
                "--parallel", "100", "--timeout", "20", "--open-timeout", "120", "--stall", "30",
                "--hold", str(self.args.minutes * 60 + 600)]
        self.holder = bl.topology.popen(bl.client.pod, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        self.holder_lines = q = queue.Queue()
        out = self.holder.stdout

        def pump() -> None:
            for line in out:
                try:
                    q.put(json.loads(line))
                except ValueError:
                    pass
        threading.Thread(target=pump, daemon=True, name="holder-out").start()
        opened = self._holder_event("open", 150.0)
        self.held_alive = opened.get("opened", 0) if opened else 0

    def _holder_event(self, kind: str, timeout: float) -> dict | None:
        deadline = _now() + timeout
        while _now() < deadline:
            try:
                ev = self.holder_lines.get(timeout=max(0.1, deadline - _now()))
            except queue.Empty:
                return None
            if ev.get("event") == kind:
                return ev
        return None

    def _close_holder(self) -> None:
        h, self.holder = self.holder, None
        try:
            h.stdin.write("close\n")
            h.stdin.flush()
        except (OSError, ValueError):
            pass
        self.bl.topology.stop(h, grace=10.0)

    # -- the local config (istiod's role), rewritten atomically --------------------------------
    def config_doc(self, i: int) -> dict:
        doc = self.bl.lab.config()
        ns = "bench"
        if i % 2:  # allow-only policy that still allows the client: re-evaluated live, nothing denied
            doc["policies"] = [
                {"name": "allow-client", "namespace": ns, "scope": "Namespace", "action": "Allow",
                 "rules": [[[{"principals": [{"Exact": f"cluster.local/ns/{ns}/sa/client"}]}]]]},
                {"name": "deny-stranger", "namespace": ns, "scope": "Namespace", "action": "Deny",
                 "rules": [[[{"principals": [{"Exact": "cluster.local/ns/other/sa/stranger"}]}]]]},
            ]
        else:
            doc["policies"] = []
        if i % 3:  # a workload that comes and goes (another pod scheduled and deleted)
            doc["workloads"].append({
                "uid": f"Kubernetes//Pod/{ns}/extra-{i % 7}", "name": f"extra-{i % 7}", "namespace": ns,
                "serviceAccount": "extra", "workloadIps": [f"198.18.0.{200 + i % 7}"], "protocol": "HBONE",
                "node": "node1"})
        return doc

    def write_config(self, i: int) -> None:
        path = self.bl.lab.config_path
        text = yaml.safe_dump(self.config_doc(i), sort_keys=False)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: a watcher sees the old file or the new one, never half
        self.config_writes += 1

    # -- traffic -------------------------------------------------------------------------------
    def _client_json(self, argv: list[str], timeout: float) -> dict | None:
        try:
            cp = self.bl.run(self.bl.client, [sys.executable, "-m", "ztunnel_fast.demo.apps", *argv],
                             timeout=timeout, check=False)
            lines = cp.stdout.strip().splitlines()
            return json.loads(lines[-1]) if lines else None
        except (subprocess.TimeoutExpired, ValueError):
            return None

    def traffic_long(self) -> None:
        i = 0
        while not self.stop_traffic.is_set():
            i += 1
            r = self._client_json(["echo", self.bl.server.ip, str(ECHO_PORT), "--size", str(LONG_BYTES),
                                   "--chunk-delay", str(LONG_CHUNK_DELAY)], timeout=180)
            if r is None:
                self.stats.add(_now(), "long", 0, 1, detail="no result (client process timed out or crashed)")
                continue
            self.stats.add(_now(), "long", r.get("ok", 0), r.get("failed", 0), r.get("mismatched", 0),
                           "; ".join(e for e in r.get("errors", []) if e))

    def traffic_short(self) -> None:
        while not self.stop_traffic.is_set():
            r = self._client_json(["echo", self.bl.server.ip, str(ECHO_PORT), "--size", str(SHORT_BYTES),
                                   "--count", str(SHORT_COUNT), "--concurrency", str(SHORT_CONCURRENCY)], timeout=180)
            if r is None:
                self.stats.add(_now(), "short", 0, SHORT_COUNT, detail="no result")
            else:
                self.stats.add(_now(), "short", r["ok"], r["failed"], r.get("mismatched", 0),
                               "; ".join(e for e in r.get("errors", []) if e))
            self.stop_traffic.wait(0.5)

    def traffic_reset(self) -> None:
        while not self.stop_traffic.is_set():
            r = self._client_json(["read", self.bl.server.ip, str(RESET_PORT)], timeout=60)
            seen = bool(r and r.get("reset"))
            self.stats.add(_now(), "reset", int(seen), int(not seen),
                           detail="" if seen else f"app reset not seen as a reset: {r}")
            self.stop_traffic.wait(2.0)

    # -- sampling ------------------------------------------------------------------------------
    @staticmethod
    def _fds(pid: int) -> int:
        try:
            return len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return 0

    def check_crashes(self) -> None:
        for name, zt in (("client", self.client), ("server", self.server)):
            if zt.proc.poll() is not None and not (name == "server" and self.expected_down):
                self.crashes.append(f"{name} ztunnel-fast exited {zt.proc.returncode} at "
                                    f"{_now() - self.t0:.0f}s")
                self.restart(name)

    def restart(self, name: str) -> None:
        """Start the side's ztunnel-fast again (same pod, config, CA and log file)."""
        bl = self.bl
        pod, zt = (bl.server, self.server) if name == "server" else (bl.client, self.client)
        ready_before = len(zt.lines("proxy ready"))
        if name == "client" and self.node is not None:
            self.client = self.start_inpod_client(wait=False)
            return
        new = bl.lab.start_ztunnel(pod, redirect=False, wait=False, **self.env)
        deadline = _now() + 60
        while _now() < deadline and len(new.lines("proxy ready")) <= ready_before:
            if new.proc.poll() is not None:
                raise RuntimeError(f"{name} ztunnel-fast did not restart: exited {new.proc.returncode}")
            time.sleep(0.1)
        if name == "server":
            self.server = new
        else:
            self.client = new

    def sample(self, label: str = "") -> dict:
        bl = self.bl
        if self.holder is not None and self.holder.poll() is None:
            try:
                self.holder.stdin.write("check\n")
                self.holder.stdin.flush()
                ev = self._holder_event("check", 60.0)
                self.held_alive = ev["alive"] if ev else 0
            except (OSError, ValueError):
                self.held_alive = 0
        c = self.stats.snapshot()
        s = {
            "t": round(_now() - self.t0, 1),
            "rss_client_mib": procstat.rss_bytes([self.client.proc.pid]) / MIB,
            "rss_server_mib": procstat.rss_bytes([self.server.proc.pid]) / MIB,
            "fds_client": self._fds(self.client.proc.pid),
            "fds_server": self._fds(self.server.proc.pid),
            "held_alive": self.held_alive,
            "hbone_conns": bl.established(bl.client, "dport = :15008"),
            "errors": c["long_err"] + c["short_err"] + c["reset_missed"],
            "mismatches": c["mismatches"],
            "crashes": len(self.crashes),
            "ok": c["long_ok"] + c["short_ok"] + c["reset_seen"],
            "config_writes": self.config_writes,
            "label": label,
        }
        self.samples.append(s)
        print(f"[soak {s['t']:7.1f}s] rss c/s {s['rss_client_mib']:.1f}/{s['rss_server_mib']:.1f} MiB  "
              f"fds c/s {s['fds_client']}/{s['fds_server']}  held {s['held_alive']}  hbone {s['hbone_conns']}  "
              f"ok {s['ok']}  errors {s['errors']}  mismatches {s['mismatches']}  crashes {s['crashes']} {label}",
              flush=True)
        return s

    def heal_holder(self) -> None:
        """After a fault kills held tunnels, open a fresh set (the app side of a reconnect)."""
        if self.held_alive < self.args.held:
            self.holder_restarts += 1
            self.start_holder()

    # -- faults --------------------------------------------------------------------------------
    def hbone_ports(self) -> set[str]:
        """Local addresses of the client pod's established connections to :15008 (the pool's)."""
        bl = self.bl
        out = bl.run(bl.client, ["ss", "-Htn", "state", "established", "dport = :15008"], check=False).stdout
        return {line.split()[2] for line in out.splitlines() if len(line.split()) >= 4}

    def fault_sigkill(self) -> dict:
        before = self.hbone_ports()
        t = _now()
        self.expected_down = True
        os.killpg(self.server.proc.pid, signal.SIGKILL)
        self.server.proc.wait(10)
        time.sleep(3.0)  # the client sees the peer gone while the peer is down
        failed = self.stats.first_event_after(t, "long", want_ok=False)
        down_errors = failed[0] if failed else None
        how = failed[1].split(":")[0] if failed and failed[1] else "?"
        self.restart("server")
        self.expected_down = False
        restarted = _now()
        ok_after = None
        deadline = _now() + 60
        while _now() < deadline and ok_after is None:
            ok_after = self.stats.first_after(restarted, "short", want_ok=True)
            time.sleep(0.5)
        after = self.hbone_ports()
        replaced = bool(after) and not (after & before)
        return {"fault": "peer SIGKILL mid-transfer, restarted",
                "observed": (f"in-flight long transfer failed {down_errors - t:.1f}s after the kill ({how})"
                             if down_errors else "no long-transfer failure recorded")
                + (f"; short connections succeed again {ok_after - restarted:.1f}s after the restart"
                   if ok_after else "; no successful short batch within 60 s of the restart")
                + f"; pool: {len(before)} HBONE connection(s) before, {len(after)} after, "
                + ("all new" if replaced else f"{len(after & before)} kept (stale)"),
                "ok": down_errors is not None and "Reset" in how and ok_after is not None and replaced}

    def fault_blackhole(self) -> dict:
        bl = self.bl
        before = bl.established(bl.client, "dport = :15008")
        rules = (("INPUT", "--dport"), ("OUTPUT", "--sport"))
        t = _now()
        for chain, flag in rules:
            netns.iptables(bl.server.pod, "-I", chain, "-p", "tcp", flag, "15008", "-j", "DROP")
        closed_after = None
        try:
            while _now() - t < BLACKHOLE_BOUND_S:
                if bl.established(bl.client, "dport = :15008") == 0:
                    closed_after = _now() - t
                    break
                time.sleep(0.5)
        finally:
            for chain, flag in rules:
                netns.iptables(bl.server.pod, "-D", chain, "-p", "tcp", flag, "15008", "-j", "DROP", check=False)
        # the PING timeout after a PING sent every 10 s, plus this loop's 0.5 s polling and the
        # proxies' 0.1 s timer tick (a 30.2 s close is on time)
        bound = PING_TIMEOUT_S + 10.0 + 0.5 + 0.1
        return {"fault": "peer blackholed (iptables DROP on 15008 in its netns)",
                "observed": (f"{before} HBONE connection(s) closed by the client {closed_after:.1f}s after the DROP"
                             if closed_after is not None else f"{before} HBONE connection(s) still open after "
                             f"{BLACKHOLE_BOUND_S:.0f}s"),
                "ok": closed_after is not None and closed_after <= bound}

    def fault_sigstop(self) -> dict:
        pid = self.server.proc.pid
        base = procstat.rss_bytes([self.client.proc.pid]) / MIB
        peak = base
        os.kill(pid, signal.SIGSTOP)
        self.stopped_pid = pid
        try:
            t = _now()
            while _now() - t < SIGSTOP_S:
                peak = max(peak, procstat.rss_bytes([self.client.proc.pid]) / MIB)
                time.sleep(0.25)
        finally:
            os.kill(pid, signal.SIGCONT)
            self.stopped_pid = None
        time.sleep(2.0)
        after = procstat.rss_bytes([self.client.proc.pid]) / MIB
        # Flow control: the client proxy may buffer at most the HTTP/2 windows (16 MiB per
        # connection) plus socket buffers; the bound below is generous on purpose.
        return {"fault": f"peer SIGSTOP for {SIGSTOP_S:.0f}s, then SIGCONT",
                "observed": f"client RSS {base:.1f} MiB before, peak {peak:.1f} MiB while stopped, "
                            f"{after:.1f} MiB 2 s after SIGCONT",
                "ok": peak - base < 64}

    def fault_truncate(self) -> dict:
        path = self.bl.lab.config_path
        good = path.read_text()
        ignored_before = len(self.client.lines("local config change ignored"))
        # Cut inside the server's address ("- 198.18" is an invalid IP), so the torn file is
        # refused deterministically; a cut on a line boundary could be valid YAML (see README).
        cut = good.index(self.bl.server.ip) + len("198.18")
        with self.config_lock:
            with open(path, "w") as f:  # a non-atomic writer, interrupted
                f.write(good[:cut])
            time.sleep(TRUNCATE_OBSERVE_S)
            t = _now()
            r = self._client_json(["echo", self.bl.server.ip, str(ECHO_PORT), "--size", "65536", "--count", "10",
                                   "--concurrency", "2"], timeout=60)
            ignored = len(self.client.lines("local config change ignored")) - ignored_before
            server_ignored = len(self.server.lines("local config change ignored")) > 0
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(good)
            os.replace(tmp, path)
        traffic_ok = bool(r and r.get("ok") == 10)
        if r:
            self.stats.add(t, "short", r["ok"], r["failed"], r.get("mismatched", 0))
        alive = self.client.proc.poll() is None and self.server.proc.poll() is None
        return {"fault": "local config truncated mid-write",
                "observed": f"client logged 'local config change ignored' {ignored}x (server: "
                            f"{'yes' if server_ignored else 'no'}); 10 connections through the last good "
                            f"state: {'all ok' if traffic_ok else r}; both processes {'alive' if alive else 'DEAD'}",
                "ok": ignored >= 1 and traffic_ok and alive}

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        total = a.minutes * 60.0
        warmup = min(max(60.0, 0.15 * total), total / 2)
        fault_plan = [(0.30, self.fault_sigkill), (0.45, self.fault_blackhole), (0.60, self.fault_sigstop),
                      (0.75, self.fault_truncate)] if not a.no_faults else []
        fault_at = [(warmup + f * (total - warmup), fn) for f, fn in fault_plan]
        self.warmup = warmup
        self.t0 = _now()
        threads = [threading.Thread(target=fn, daemon=True, name=fn.__name__)
                   for fn in (self.traffic_long, self.traffic_short, self.traffic_reset)]
        for th in threads:
            th.start()
        next_sample, next_config, i = 0.0, a.config_interval, 0
        while (now := _now() - self.t0) < total:
            if fault_at and now >= fault_at[0][0]:
                _, fn = fault_at.pop(0)
                start = now
                print(f"[soak {now:7.1f}s] fault: {fn.__name__}", flush=True)
                rec = fn()
                rec.update(at_s=round(start, 1), took_s=round(_now() - self.t0 - start, 1))
                self.faults.append(rec)
                print(f"[soak] {rec['fault']}: {rec['observed']} -> {'as expected' if rec['ok'] else 'NOT as expected'}",
                      flush=True)
                self.sample(label=fn.__name__.removeprefix("fault_"))
                self.heal_holder()
                continue
            if now >= next_config:
                i += 1
                with self.config_lock:
                    self.write_config(i)
                next_config = now + a.config_interval
            if now >= next_sample:
                self.check_crashes()
                self.sample()
                next_sample = now + a.interval
            time.sleep(0.2)
        self.stop_traffic.set()
        for th in threads:
            th.join(200)
        self.check_crashes()
        self.sample(label="end")

    def finish(self) -> None:
        """Close the held tunnels, raise the fast paths' loggers to info (only the drain lines come
        after: no traffic is left), drain both proxies and read their fast-path counters (the
        server's count from its last start: the SIGKILL fault restarts it) and WARN/ERROR lines."""
        bl = self.bl
        if self.holder is not None:
            self._close_holder()
        for pod, zt in ((self.client_host(), self.client), (bl.server, self.server)):
            if zt.proc.poll() is None:
                bl.lab.http(pod, f"http://127.0.0.1:15000/logging?level={DRAIN_LOG_LEVEL}", method="POST")
        for zt in (self.client, self.server):
            bl.lab.stop_ztunnel(zt)
        self.fast = {"outbound": _last_stats(self.client.lines("fast path: "), OUTBOUND_STATS),
                     "inbound": _last_stats(self.server.lines("inbound fast path: "), INBOUND_STATS)}
        for side, zt in (("client", self.client), ("server", self.server)):
            for line in zt.log().splitlines():
                m = LOG_PROBLEM.match(line)
                if m:
                    text = m[2]
                    if "connection complete" in text:  # an access log line: its error says what
                        text = "access log: connection complete " + (text.split(" error=", 1) + ["(no error)"])[1]
                    text = re.sub(r"[0-9a-f]{8,}|[0-9]+", "N", re.sub(r"\{[^}]*\}", "{..}", text))
                    key = f"{m[1]} {side}: {text[:160]}"
                    self.log_problems[key] = self.log_problems.get(key, 0) + 1

    def teardown(self) -> None:
        if self.stopped_pid is not None:
            try:
                os.kill(self.stopped_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.stop_traffic.set()
        if self.holder is not None:
            try:
                self._close_holder()
            except Exception:  # noqa: BLE001 - teardown goes on regardless
                pass
        if self.cni is not None:
            self.cni.close()
        if self.bl is not None:
            self.bl.teardown()
        if self.cni_dir is not None:
            import shutil

            shutil.rmtree(self.cni_dir, ignore_errors=True)


def _last_stats(lines: list[str], pattern: re.Pattern) -> tuple[int, ...] | None:
    found = [m for m in map(pattern.search, lines) if m]
    return tuple(int(g) for g in found[-1].groups()) if found else None


# ------------------------------------------------------------------------------------ the report
def _flat(samples: list[dict], key: str, warmup: float) -> tuple[float, float]:
    """Median of the first three samples after warm-up and of the last three (fault samples left
    out: they are taken at the fault's worst moment)."""
    after = [s[key] for s in samples if s["t"] >= warmup and not s["label"]]
    if len(after) < 2:
        return (float("nan"), float("nan"))
    return statistics.median(after[:3]), statistics.median(after[-3:])


def targets(soak: Soak) -> list[tuple[str, str, str, bool]]:
    s = soak.samples[-1]
    rows = [("hash mismatches", "0", str(s["mismatches"]), s["mismatches"] == 0),
            ("crashes (a ztunnel-fast exiting unasked)", "0", str(len(soak.crashes)), not soak.crashes)]
    for key, unit, slack in (("rss_client_mib", "MiB", 16.0), ("rss_server_mib", "MiB", 16.0),
                             ("fds_client", "", 50), ("fds_server", "", 50)):
        a, b = _flat(soak.samples, key, soak.warmup)
        fmt = "{:.1f}" if unit else "{:.0f}"
        rows.append((f"{key.replace('_mib', '').replace('_', ' ')} flat after warm-up",
                     f"growth < {slack:g}{(' ' + unit) if unit else ''}",
                     f"{fmt.format(a)} -> {fmt.format(b)} {unit}".strip(), b - a < slack))
    args = getattr(soak, "args", None)
    if args is not None and args.fast_path and args.engine == "native":  # the run covered both fast paths
        fast = getattr(soak, "fast", {})
        got = fast.get("outbound")
        # the workers carry every connection of a class but the first after each flush (config
        # write): most of them, unless the fast path keeps handing its connections back
        share = got[0] / max(1, got[0] + got[1]) if got else 0.0
        rows.append(("connections carried by the client's workers (outbound fast path)", ">= 50% of all",
                     f"{got[0]} carried ({share:.0%}), {got[1]} by the event loop, {got[2]} flushes" if got
                     else "no drain line", share >= 0.5))
        # (the inbound counters leave out the misses: the first CONNECT of a class per HBONE
        # connection and flush goes to the event loop uncounted)
        got = fast.get("inbound")
        rows.append(("CONNECTs answered by the server's workers (inbound fast path)", "> 0",
                     f"{got[0]} answered, {got[1]} handed back, {got[2]} flushes" if got else "no drain line",
                     bool(got and got[0] > 0)))
    return rows


def markdown(soak: Soak, meta: dict) -> str:
    a = soak.args
    client_side = ("a node's ztunnel-fast in in-pod mode (the client pod handed over by istio-cni's double)"
                   if a.inpod else "a dedicated ztunnel-fast in the client pod")
    out = [f"# Soak run {meta['stamp']}", "",
           f"`python -m bench.soak --minutes {a.minutes:g} --engine {a.engine}{'' if a.fast_path else ' --no-fast-path'}{' --inpod' if a.inpod else ''}` on {meta['machine']['nproc']} cores "
           f"({meta['machine']['cpu_model']}, {meta['machine']['os']}, Linux {meta['machine']['kernel']}); "
           f"load average at start {meta['machine']['loadavg_at_start']}, at end {meta['loadavg_at_end']}. "
           "The machine is shared with other work, which the load average shows; figures are "
           "what this run saw, not a clean-room measurement.", "",
           f"Traffic: long echo transfers of {LONG_BYTES // MIB} MiB (paced), batches of {SHORT_COUNT} short echo "
           f"connections ({SHORT_BYTES} B, {SHORT_CONCURRENCY} at a time), {a.held} held tunnels checked at every "
           f"sample, an app resetting every connection; the local config rewritten atomically every "
           f"{a.config_interval:g} s ({soak.config_writes} writes: policies and a workload added and removed); "
           f"SECRET_TTL={a.secret_ttl} (certificates renewed at half-life). Warm-up: {soak.warmup:.0f} s. "
           f"Engine: {a.engine}{' with ZTUNNEL_FAST_PATH=true' if a.fast_path else ''}; client side: {client_side}, "
           f"server side: a dedicated ztunnel-fast in the server pod; commit {meta['versions'].get('git_commit')}"
           f"{' (dirty)' if meta['versions'].get('git_dirty') else ''}.", "",
           "## Targets", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
    for name, want, got, ok in targets(soak):
        out.append(f"| {name} | {want} | {got} | {'yes' if ok else '**no**'} |")
    c = soak.stats.snapshot()
    out += ["", "## Outcomes", "", "| kind | succeeded | failed |", "|---|---:|---:|",
            f"| long transfers ({LONG_BYTES // MIB} MiB, sha256 checked) | {c['long_ok']} | {c['long_err']} |",
            f"| short connections (sha256 checked) | {c['short_ok']} | {c['short_err']} |",
            f"| app resets seen by the client as a reset | {c['reset_seen']} | {c['reset_missed']} |",
            "", "Failures are expected only around the faults (a killed or blackholed peer fails the "
            "tunnels through it, with a reset); the time series shows when they happened. Held tunnel "
            f"sets reopened after a fault: {soak.holder_restarts}.", ""]
    if soak.crashes:
        out += ["Crashes: " + "; ".join(soak.crashes), ""]
    out += ["## Faults", "", "| at (s) | fault | observed | as expected |", "|---:|---|---|---|"]
    for f in soak.faults:
        out.append(f"| {f['at_s']:.0f} | {f['fault']} | {f['observed']} | {'yes' if f['ok'] else '**no**'} |")
    if not soak.faults:
        out.append("| – | none (--no-faults) | | |")
    out += ["", "## Over time", "",
            "One row per 30 s (the last sample in it); fault rows are sampled right after the fault.", "",
            "| t (s) | RSS client (MiB) | RSS server (MiB) | fds client | fds server | held tunnels alive "
            "| HBONE conns | ok (cum.) | errors (cum.) | hash mismatches | crashes | note |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    last_bucket = None
    rows = []
    for s in soak.samples:
        bucket = int(s["t"] // 30)
        if s["label"] or bucket != last_bucket or s is soak.samples[-1]:
            rows.append(s)
        elif rows:
            rows[-1] = s
        last_bucket = bucket
    for s in rows:
        out.append(f"| {s['t']:.0f} | {s['rss_client_mib']:.1f} | {s['rss_server_mib']:.1f} | {s['fds_client']} | "
                   f"{s['fds_server']} | {s['held_alive']} | {s['hbone_conns']} | {s['ok']} | {s['errors']} | "
                   f"{s['mismatches']} | {s['crashes']} | {s['label']} |")
    if soak.log_problems:
        out += ["", "## WARN and ERROR lines of the proxies", "", "| line (digits as N) | times |", "|---|---:|"]
        for text, n in sorted(soak.log_problems.items(), key=lambda kv: -kv[1])[:20]:
            out.append(f"| `{text}` | {n} |")
    if soak.stats.error_kinds:
        out += ["", "## Errors by kind", "", "| failed result (first error of the batch) | times |", "|---|---:|"]
        for text, n in sorted(soak.stats.error_kinds.items(), key=lambda kv: -kv[1])[:20]:
            out.append(f"| `{text}` | {n} |")
    return "\n".join(out) + "\n"


def chart(soak: Soak, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in soak.samples]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    series = [
        (axes[0], "RSS (MiB)", [("client", "rss_client_mib"), ("server", "rss_server_mib")]),
        (axes[1], "open descriptors", [("client", "fds_client"), ("server", "fds_server")]),
        (axes[2], "tunnels", [("held tunnels alive", "held_alive"), ("HBONE connections", "hbone_conns")]),
        (axes[3], "cumulative", [("errors", "errors"), ("hash mismatches", "mismatches"), ("crashes", "crashes")]),
    ]
    for ax, ylabel, lines in series:
        for label, key in lines:
            ax.plot(t, [s[key] for s in soak.samples], label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.axvspan(0, soak.warmup / 60, color="grey", alpha=0.12)
        for f in soak.faults:
            ax.axvline(f["at_s"] / 60, color="red", alpha=0.5, linestyle="--")
        ax.legend(loc="upper left", fontsize=8)
    for f in soak.faults:
        axes[0].annotate(f["fault"].split(" (")[0].split(",")[0], (f["at_s"] / 60, axes[0].get_ylim()[1]),
                         fontsize=7, rotation=90, va="top", ha="right", color="red")
    axes[-1].set_xlabel("minutes (grey: warm-up; red: faults)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="run length (default 30)")
    p.add_argument("--engine", choices=("native", "pure"), default="native")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--config-interval", type=float, default=3.0, help="seconds between config rewrites")
    p.add_argument("--secret-ttl", default="90s", help="SECRET_TTL of both proxies (renewed at half-life)")
    p.add_argument("--held", type=int, default=1000, help="tunnels held open for the whole run")
    p.add_argument("--no-faults", action="store_true")
    p.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=True,
                   help="both proxies with ZTUNNEL_FAST_PATH=true, the default (native engine); "
                        "--no-fast-path: =false")
    p.add_argument("--inpod", action="store_true",
                   help="the client side's ztunnel-fast is a node's in in-pod mode (istio-cni's double hands it the pod)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep-workdir", action="store_true", help="keep the proxies' logs and configs")
    a = p.parse_args(argv)
    if a.minutes < 3 and not a.no_faults:
        p.error("the faults need at least --minutes 3 (or pass --no-faults)")
    return a


def main(argv: list[str] | None = None) -> int:
    if os.geteuid() != 0:
        print("bench.soak: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    args = parse_args(argv)
    # SIGTERM ends the run like Ctrl-C, through the finally below (netns's own handler tears the
    # namespaces down first, then calls this one); the default action would skip the finally and
    # leave the work directory (with the run's CA key) behind.
    signal.signal(signal.SIGTERM, _terminated)
    netns.cleanup_stale("ztb-")
    workdir = Path(tempfile.mkdtemp(prefix="ztunnel-fast-soak-"))
    soak = Soak(args, workdir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    meta = {"stamp": stamp, "machine": machine_info(), "versions": versions(None)}
    try:
        soak.start()
        soak.run()
        try:
            soak.finish()
        except Exception as exc:  # noqa: BLE001 - the run's samples are still reported (fast-path rows: no drain line)
            print(f"soak: reading the drain lines failed: {exc!r}", file=sys.stderr)
    finally:
        soak.teardown()
        if not args.keep_workdir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"soak: workdir kept at {workdir}")
    meta["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(soak, meta)
    md_path = args.out / f"soak-{stamp}.md"
    md_path.write_text(md)
    png = args.out / f"soak-{stamp}.png"
    chart(soak, png, f"ztunnel-fast soak {stamp} ({args.engine}{' + fast path' if args.fast_path else ''}{', in-pod client' if args.inpod else ''}, {args.minutes:g} min)")
    print(md)
    print(f"wrote {md_path} and {png}")
    met = all(ok for *_, ok in targets(soak))
    return 0 if met else 1


def _terminated(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
