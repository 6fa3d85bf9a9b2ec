"""Shared helpers of the fast-path end-to-end tests: test_fast_path.py (outbound),
test_fast_path_inbound.py (inbound), test_fast_path_inpod.py (outbound in in-pod mode) and
test_fast_path_inbound_inpod.py (inbound in in-pod mode).

What they share:
- set-up: FAST (the switch), `two_pods` (a client and an echo server, each with its own
  ztunnel-fast), `publish` (an atomic config change), DENY_CLIENT (a policy that denies the client);
- reading what a ztunnel left behind: `metrics`, `access_lines`, `wait_lines`, and the fast paths'
  counters from their drain lines (`outbound_stats`, `inbound_stats`, `inbound_netns_errors`,
  `expect_counters`) and a process's descriptors (`fds`);
- the shared runs and checks: `sequential_hash_checked`, `many_short_hash_checked`, `race` (a
  change published while connections stream in), `assert_no_connect_after_deny` and
  `held_tunnels` (many tunnels held open, then each hash-checked);
- the comparison of the switch on and off: `run_cases` (each case cold, then warm), `view` (the
  lines, access log and metrics a ztunnel left, one pod's name and IP made generic) and
  `assert_same`.

Invariants: every helper is bounded in time; a process a helper starts is killed or waited for
before it returns, also when it fails; traffic goes only between the Lab's pods; pods, namespaces
and ztunnel processes belong to the Lab (tests/conftest.py) and are torn down by its fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

FAST = {"ZTUNNEL_FAST_PATH": "true"}
SLOW = {"ZTUNNEL_FAST_PATH": "false"}  # the switch is on by default: "off" is said, never assumed
OUTBOUND_STATS = re.compile(r"fast path: (\d+) connections carried by the workers, (\d+) by the event loop's path, "
                            r"(\d+) flushes")
INBOUND_STATS = re.compile(r"inbound fast path: (\d+) CONNECTs answered by the workers, (\d+) handed back, "
                           r"(\d+) flushes")
INBOUND_NETNS_ERRORS = re.compile(r"inbound fast path: .*, (\d+) pod namespace errors")
DENY_CLIENT = {"name": "deny-sleep", "namespace": "demo", "scope": "Namespace", "action": "Deny",
               "rules": [[[{"principals": [{"Exact": "cluster.local/ns/demo/sa/sleep"}]}]]]}


# -- set-up -------------------------------------------------------------------------------------
def two_pods(lab, *, client_env=None, server_env=None, frozen: str | None = None):
    """sleep (the client, its outbound redirected to its ztunnel-fast) and httpbin (an echo app on
    80, its ztunnel-fast not redirected) in namespace demo: (a, b, za, zb).  `frozen` ("client" or
    "server"): that side's ztunnel-fast keeps the first config (a copy of its own) while the test
    changes the other side's."""
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    env = {"client": dict(client_env or {}), "server": dict(server_env or {})}
    if frozen is not None:
        copy = lab.workdir / f"{frozen}-config.yaml"
        copy.write_text(lab.config_path.read_text())
        env[frozen]["LOCAL_XDS_PATH"] = str(copy)
    za = lab.start_ztunnel(a, **env["client"])
    zb = lab.start_ztunnel(b, redirect=False, **env["server"])
    return a, b, za, zb


def publish(lab, policies: list | None = None) -> None:
    """Write the Lab's config (with `policies` when given) atomically: the watcher never reads half a file."""
    cfg = lab.config()
    if policies is not None:
        cfg["policies"] = policies
    tmp = lab.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, lab.config_path)


# -- what a ztunnel left behind -----------------------------------------------------------------
def metrics(lab, pod) -> dict[tuple, float]:
    """The istio_tcp samples of `pod`'s ztunnel-fast: {(name, sorted labels): value}."""
    status, body = lab.http(pod, "http://127.0.0.1:15020/metrics")
    assert status == 200
    out: dict[tuple, float] = {}
    for fam in text_string_to_metric_families(body):
        if not fam.name.startswith("istio_tcp"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_values(m: dict[tuple, float], name: str) -> list[float]:
    return [v for (n, _), v in m.items() if n == name]


def access_lines(zt, direction="outbound") -> list[dict[str, str]]:
    """The access log's fields, minus what differs per connection (client port, duration, ids)."""
    out = []
    for line in zt.lines("connection complete"):
        if f"direction={direction}" not in line:
            continue
        fields = dict(re.findall(r'(\S+?)=("[^"]*"|\S+)', line.split("connection complete", 1)[1]))
        fields.pop("duration", None)
        fields["src.addr"] = fields["src.addr"].rsplit(":", 1)[0]
        level = line.split()[1]
        out.append({"level": level, **fields})
    return out


def wait_lines(zt, text: str, n: int, timeout: float = 10) -> list[str]:
    """`zt`'s lines holding `text` once there are `n` of them, or after `timeout` s (the caller asserts)."""
    deadline = time.monotonic() + timeout
    while len(zt.lines(text)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return zt.lines(text)


def trace_id(line: str, span: str = "inbound") -> str:
    """The trace id of a line logged in an `inbound{id=... ...}` or `outbound{id=...}` span."""
    return re.split(r"[ }]", line.split(f"{span}{{id=", 1)[1], maxsplit=1)[0]


def _drain_counters(lab, zt, pattern: re.Pattern) -> tuple[int, int, int] | None:
    lab.stop_ztunnel(zt)
    found = [m for m in map(pattern.search, zt.lines("fast path: ")) if m]
    return tuple(int(g) for g in found[-1].groups()) if found else None


def outbound_stats(lab, zt) -> tuple[int, int, int] | None:
    """Stops `zt`; (carried by the workers, by the event loop, flushes) from its drain line; None: no fast path."""
    return _drain_counters(lab, zt, OUTBOUND_STATS)


def inbound_stats(lab, zt) -> tuple[int, int, int] | None:
    """Stops `zt`; (answered by the workers, handed back, flushes) from its drain line; None: no fast path."""
    return _drain_counters(lab, zt, INBOUND_STATS)


def inbound_netns_errors(lab, zt) -> int | None:
    """Stops `zt`; the CONNECTs its workers handed back because they could not create the upstream
    socket in the pod's namespace (its drain line); None: no fast path."""
    found = _drain_counters(lab, zt, INBOUND_NETNS_ERRORS)
    return found[0] if found else None


def fds(proc) -> list[str]:
    """What the process's descriptors point at (readlink of /proc/<pid>/fd/*), sorted."""
    out = []
    for name in os.listdir(f"/proc/{proc.pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            out.append(os.readlink(f"/proc/{proc.pid}/fd/{name}"))
    return sorted(out)


def expect_counters(stats, engine: str, fast: bool = True):
    """The counters where a fast path runs (native engine, switch on: they must be there); elsewhere
    there must be none (the pure twin ignores the switch), and None is returned."""
    if fast and engine == "native":
        assert stats is not None, "the native engine with the switch on logged no fast-path counters"
        return stats
    assert stats is None, stats
    return None


# -- shared runs and checks ---------------------------------------------------------------------
def sequential_hash_checked(lab, a, b, za, zb, n: int, *, seen_by: str):
    """`n` echo connections of 3000 bytes, one after the other, from a to b:80, every one intact;
    za's proxy lines and zb's CONNECT lines carry the same n trace ids.  `seen_by`: "client" (za's
    outbound side) or "server" (zb's inbound side), whose access log has n equal lines (3000 bytes
    each way) and whose metrics count n connections opened and n closed.
    Returns (za's proxy lines, zb's CONNECT lines, the access lines, the metrics)."""
    out = lab.client(a, "echo", b.ip, "80", "--size", "3000", "--count", str(n), "--concurrency", "1")
    assert out["ok"] == n and out["failed"] == 0 and out["mismatched"] == 0, out
    zt, pod, direction = (za, a, "outbound") if seen_by == "client" else (zb, b, "inbound")
    assert len(wait_lines(zt, "complete dur=", n)) == n
    proxy = za.lines(f"proxy to {b.ip}:80 using HBONE via {b.ip}:15008 type Direct")
    ids = {trace_id(line, "outbound") for line in proxy}
    assert len(proxy) == n and len(ids) == n and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # the server saw each connection's trace id
    got = zb.lines(f"got CONNECT request to {b.ip}:80")
    assert len(got) == n and {trace_id(line) for line in got} == ids
    access = access_lines(zt, direction)
    assert len(access) == n and all(x == access[0] for x in access)
    assert access[0]["bytes_sent"] == "3000" and access[0]["bytes_recv"] == "3000", access[0]
    m = metrics(lab, pod)
    assert metric_values(m, "istio_tcp_connections_opened_total") == [n], m
    assert metric_values(m, "istio_tcp_connections_closed_total") == [n], m
    return proxy, got, access, m


def many_short_hash_checked(lab, client, ip: str, n: int, *, concurrency: int, done_on, got_on, pod,
                            timeout: float) -> None:
    """`n` echo connections of 1 KiB from `client` to ip:80, `concurrency` at a time, every one
    intact: `done_on` (the ztunnel whose completions are counted) logs n, `got_on` (the
    destination's) n CONNECTs to ip:80, and the metrics of `pod`'s ztunnel count n connections
    closed and n KiB each way."""
    out = lab.client(client, "echo", ip, "80", "--size", "1024", "--count", str(n), "--concurrency", str(concurrency),
                     timeout=timeout)
    assert out["ok"] == n and out["failed"] == 0 and out["mismatched"] == 0, out
    assert len(wait_lines(done_on, "complete dur=", n, timeout=30)) == n
    assert len(got_on.lines(f"got CONNECT request to {ip}:80")) == n
    m = metrics(lab, pod)
    assert metric_values(m, "istio_tcp_connections_closed_total") == [n], m
    assert sum(metric_values(m, "istio_tcp_sent_bytes_total")) == n * 1024, m
    assert sum(metric_values(m, "istio_tcp_received_bytes_total")) == n * 1024, m


def report(out_path: Path) -> dict:
    """A background client's JSON report (asyncio may print a warning about a reset after it)."""
    return json.loads([line for line in out_path.read_text().splitlines() if line.startswith("{")][-1])


class Held:
    """The `hold-many` client of `held_tunnels`: `established` (tunnels it holds), `release()`."""

    def __init__(self, proc: subprocess.Popen, out_path: Path):
        self.proc = proc
        self.out_path = out_path
        self.established = 0

    def output(self) -> str:
        return self.out_path.read_text()

    def release(self, timeout: float = 120) -> dict:
        """Let the tunnels go: each echoes its payload (sha256 checked) and closes; the report."""
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
        return report(self.out_path)


@contextlib.contextmanager
def held_tunnels(lab, client, ip: str, count: int, *, size: int = 4096):
    """`count` tunnels from `client` to ip:80, opened one after the other and held open (each proven
    by an echo round trip) until `Held.release()`, which echoes `size` bytes on each.  Waits (at
    most 120 s) until they are established; the client is killed on the way out if still running."""
    out_path = lab.workdir / f"held-{client.name}-{len(list(lab.workdir.glob('held-*')))}.out"
    with open(out_path, "wb") as out:
        proc = lab.topology.popen(client.pod, [sys.executable, "-m", "ztunnel_fast.demo.apps", "hold-many", ip, "80",
                                               "--count", str(count), "--size", str(size), "--seconds", "300"],
                                  stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    held = Held(proc, out_path)
    try:
        deadline = time.monotonic() + 120
        while '"established"' not in held.output() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        line = next((x for x in held.output().splitlines() if '"established"' in x), None)
        held.established = json.loads(line)["count"] if line else 0
        yield held
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()


def race(lab, client, ip: str, zt, change, *, total: int, after: int = 60) -> dict:
    """`total` echo connections of 500 bytes from `client` to ip:80, 4 at a time, in the background;
    once `zt` has logged `after` completions (or 60 s passed), `change()`.  Returns the client's
    report once it is done; the client is killed if it is not within 120 s (and on any failure)."""
    proc, out_path = lab.client_background(client, "echo", ip, "80", "--size", "500", "--count", str(total),
                                           "--concurrency", "4")
    try:
        deadline = time.monotonic() + 60
        while len(zt.lines("complete dur=")) < after and time.monotonic() < deadline:
            time.sleep(0.02)
        change()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return report(out_path)


def assert_no_connect_after_deny(zt, out: dict, total: int) -> None:
    """A policy denying the client was published while `total` connections streamed in (`out`: the
    client's report).  Each CONNECT is checked against the policy in force when the destination's
    ztunnel `zt` took it (its `got CONNECT` line before or after its reload line): every one after
    the reload is refused with 401, none reaches the app; those before either completed or were
    closed by the change (at most the 4 in flight had echoed everything already)."""
    assert out["ok"] + out["failed"] == total and out["mismatched"] == 0, out
    lines = zt.log().splitlines()
    reload = next(i for i, line in enumerate(lines) if "local config reloaded" in line)
    taken = {trace_id(line): i for i, line in enumerate(lines) if "got CONNECT request to" in line}
    ended_ok = {trace_id(line) for line in lines if "inbound{id=" in line and "complete dur=" in line}
    refused = {trace_id(line) for line in lines if "inbound{id=" in line and "refused CONNECT with 401" in line}
    after = {t for t, i in taken.items() if i > reload}
    assert len(after) >= 20, len(after)  # the change came while connections were streaming in
    assert after <= refused and not after & ended_ok
    assert len(taken) == total
    assert len(ended_ok) <= out["ok"] <= len(ended_ok) + 4 and len(ended_ok) >= 50, (out, len(ended_ok))


# -- the switch on against the switch off -------------------------------------------------------
def run_cases(lab, client, cases) -> list[tuple]:
    """Each (name, ip, port) case from `client`, cold (one connection) then warm (three), 777 bytes
    each: [(name, count, ok, failed)]."""
    outcome = []
    for name, ip, port in cases:
        for count in (1, 3):
            out = lab.client(client, "echo", ip, port, "--size", "777", "--count", str(count))
            outcome.append((name, count, out["ok"], out["failed"]))
    return outcome


def view(lab, zt, pod, direction: str, **lines: list[str]) -> dict[str, list[str]]:
    """What `zt` left behind, with `pod`'s IP and name written POD-IP and POD (so that two pods'
    views compare): its access-log lines of `direction`, the istio_tcp metrics of `pod`'s ztunnel,
    and each of `lines`; every part sorted."""
    def generic(value) -> str:
        return str(value).replace(pod.ip, "POD-IP").replace(pod.name, "POD")

    parts = {"access": [sorted(f.items()) for f in access_lines(zt, direction)],
             "metrics": list(metrics(lab, pod).items()), **lines}
    return {name: sorted(generic(x) for x in part) for name, part in parts.items()}


def after_span(lines: list[str]) -> list[str]:
    """The lines from the end of their span on (the span holds the per-connection trace id)."""
    return [line.split("}", 1)[1] for line in lines]


def assert_same(on: dict, off: dict) -> None:
    """Two views (the switch on, the switch off) are equal, part by part."""
    assert on.keys() == off.keys()
    for part, seen in on.items():
        assert seen == off[part], (part, seen, off[part])
