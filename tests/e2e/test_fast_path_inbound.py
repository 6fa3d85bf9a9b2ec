"""The inbound fast path (ZTUNNEL_FAST_PATH on the destination's ztunnel): native workers answer
the peer's CONNECTs of classes the event loop allowed once (dial the app, 200, splice); the pure twin
ignores the switch and keeps today's path.  Whatever path answers a CONNECT, the outcome, the logs,
the access log and the metrics (reporter=destination) must be the same: cases run with the switch
on and off, cold and warm, on both engines.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import yaml

from .test_fast_path import FAST, access_lines, metrics

pytestmark = pytest.mark.e2e

STATS = re.compile(r"inbound fast path: (\d+) CONNECTs answered by the workers, (\d+) handed back, (\d+) flushes")


def inbound_stats(lab, zt) -> tuple[int, int, int] | None:
    """(answered by the workers, handed back, flushes) from the line drain logs; None: no fast path."""
    lab.stop_ztunnel(zt)
    found = [m for m in (STATS.search(line) for line in zt.lines("inbound fast path: ")) if m]
    return tuple(int(g) for g in found[-1].groups()) if found else None


def wait_lines(zt, text: str, n: int, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(zt.lines(text)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return zt.lines(text)


def _report(out_path) -> dict:
    """The background client's JSON report (asyncio may print a warning about a reset after it)."""
    return json.loads([line for line in out_path.read_text().splitlines() if line.startswith("{")][-1])


def _publish(lab, policies) -> None:
    """Write the config atomically (the watcher never reads half a file)."""
    cfg = lab.config()
    cfg["policies"] = policies
    tmp = lab.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, lab.config_path)


def _server_view(lab, zt, pod, client_ip) -> tuple:
    """The destination's inbound lines, access log and metrics, minus what differs per connection."""
    access = sorted(sorted(f.items()) for f in access_lines(zt, "inbound"))
    m = sorted((name, labels, v) for (name, labels), v in metrics(lab, pod).items())
    got = sorted(line.split("}", 1)[1] for line in zt.lines("got CONNECT request to"))
    refused = sorted(line.split("}", 1)[1] for line in zt.lines("refused CONNECT"))
    failed = sorted(line.split("err=", 1)[1] for line in zt.lines("failed dur="))
    return access, m, got, refused, failed


@pytest.mark.parametrize("fast", [False, True], ids=["fast-off", "fast-on"])
def test_sequential_connects_hash_checked_with_the_same_logs_and_metrics(lab, engine, fast):
    """40 connections one after the other through one HBONE connection: the first is the event
    loop's (it installs the class), the rest the workers'.  Each carries its own trace id from the
    client to the server's lines; the access log lines and metrics are those of the event loop's
    path."""
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a)
    zb = lab.start_ztunnel(b, redirect=False, **(FAST if fast else {}))
    n = 40
    out = lab.client(a, "echo", b.ip, "80", "--size", "3000", "--count", str(n), "--concurrency", "1")
    assert out["ok"] == n and out["failed"] == 0 and out["mismatched"] == 0, out
    done = wait_lines(zb, "complete dur=", n)
    assert len(done) == n
    proxy = za.lines(f"proxy to {b.ip}:80 using HBONE via {b.ip}:15008 type Direct")
    ids = {line.split("outbound{id=")[1].split("}")[0] for line in proxy}
    got = zb.lines(f"got CONNECT request to {b.ip}:80")
    assert len(got) == n and {line.split("inbound{id=")[1].split(" ")[0] for line in got} == ids
    assert all(f"peer_ip={a.ip} peer_id=spiffe://cluster.local/ns/demo/sa/sleep}}" in line for line in got)
    access = access_lines(zb, "inbound")
    assert len(access) == n and all(x == access[0] for x in access)
    assert access[0]["bytes_sent"] == "3000" and access[0]["bytes_recv"] == "3000", access[0]
    assert access[0]["src.workload"] == "sleep" and access[0]["dst.workload"] == "httpbin", access[0]
    m = metrics(lab, b)
    opened = [(dict(labels), v) for (name, labels), v in m.items() if name == "istio_tcp_connections_opened_total"]
    closed = [v for (name, _), v in m.items() if name == "istio_tcp_connections_closed_total"]
    assert [v for _, v in opened] == [n] and closed == [n], m
    assert opened[0][0]["reporter"] == "destination"
    assert sum(v for (name, _), v in m.items() if name == "istio_tcp_received_bytes_total") == n * 3000
    stats = inbound_stats(lab, zb)
    if fast and engine == "native":
        answered, handed, _ = stats
        assert answered == n - 1 and handed == 0, stats  # cold: the first one installs the class
    else:
        assert stats is None


DENY_PORT_81 = {"name": "deny-81", "namespace": "demo", "scope": "Namespace", "action": "Deny",
                "rules": [[[{"principals": [{"Exact": "cluster.local/ns/demo/sa/sleep"}], "destinationPorts": [81]}]]]}


def _normalize(value, server) -> str:
    return str(value).replace(server.ip, "SERVER-IP").replace(server.name, "SERVER")


def test_every_routing_and_policy_case_agrees_cold_and_warm(lab, engine):
    """The same cases against a destination whose ztunnel has the switch on (alpha) and one whose
    ztunnel has it off (bravo): an allowed port (cached), a port a policy denies (401, never
    cached), a port nothing listens on (allowed, so cached; each warm dial is refused and handed
    back: 503 with the event loop's wording), and the destination through a service VIP (the same
    class as direct, but the service labels come from each request's `forwarded`).  Each case
    runs cold (one connection) then warm (three): outcomes, access log lines, metrics and lines
    (server name and IP aside) must be equal."""
    a = lab.pod("sleep", namespace="demo")
    servers = [lab.pod("alpha", namespace="demo"), lab.pod("bravo", namespace="demo")]
    vips = {"alpha": "10.96.0.11", "bravo": "10.96.0.12"}
    for s in servers:
        lab.service(f"echo-{s.name}", "demo", vips[s.name], {80: 80}, [s])
    lab.write_config()
    _publish(lab, [DENY_PORT_81])
    for s in servers:
        lab.app(s, "serve", "80", "echo", port=80)
        lab.app(s, "serve", "81", "echo", port=81)
    lab.start_ztunnel(a)
    zts = {"alpha": lab.start_ztunnel(servers[0], redirect=False, **FAST),
           "bravo": lab.start_ztunnel(servers[1], redirect=False)}
    results = {}
    for s in servers:
        zt = zts[s.name]
        cases = [("allowed", s.ip, "80"), ("denied", s.ip, "81"), ("refused", s.ip, "82"),
                 ("service", vips[s.name], "80")]
        outcome = []
        for name, ip, port in cases:
            for count in (1, 3):  # cold, then warm
                out = lab.client(a, "echo", ip, port, "--size", "777", "--count", str(count))
                outcome.append((name, count, out["ok"], out["failed"]))
        wait_lines(zt, "connection complete", 16)
        view = _server_view(lab, zt, s, a.ip)
        results[s.name] = (outcome, *(sorted(_normalize(x, s) for x in part) for part in view),
                           inbound_stats(lab, zt))
    f, s = results["alpha"], results["bravo"]
    assert f[0] == s[0]
    assert [o[2:] for o in f[0]] == [(1, 0), (3, 0), (0, 1), (0, 3), (0, 1), (0, 3), (1, 0), (3, 0)]
    assert f[1:6] == s[1:6]
    access, m, got, refused, _ = f[1:6]
    assert len(access) == 16 and len(got) == 16 and len(refused) == 8, (access, got, refused)
    assert sum("401" in x for x in refused) == 4 and sum("failed to connect to SERVER-IP:82" in x for x in refused) == 4
    assert any("echo-SERVER.demo.svc.cluster.local" in x for x in m), m  # the service labels
    assert s[6] is None
    if engine == "native":
        # warm allowed (3) and every service connection (4) by the workers; warm refused dials handed back (3)
        assert f[6][:2] == (7, 3), f[6]
    else:
        assert f[6] is None


def test_a_policy_change_racing_connects_lets_no_denied_one_through(lab, engine):
    """Connections stream in (4 at a time) while a policy that denies the client is published to
    the destination's ztunnel, whose workers answer the warm ones.  Each CONNECT is checked against
    the policy in force when the destination took it (its `got CONNECT` line before or after the
    reload line): every one after it is refused, none reaches the app; those before either
    completed or were closed by the change; every payload that completed is intact."""
    from .test_fast_path import DENY_CLIENT

    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    lab.start_ztunnel(a)
    zb = lab.start_ztunnel(b, redirect=False, **FAST)
    total = 1000
    proc, out_path = lab.client_background(a, "echo", b.ip, "80", "--size", "500", "--count", str(total),
                                           "--concurrency", "4")
    deadline = time.monotonic() + 60
    while len(zb.lines("complete dur=")) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    _publish(lab, [DENY_CLIENT])
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = _report(out_path)
    assert out["ok"] + out["failed"] == total and out["mismatched"] == 0, out
    lines = zb.log().splitlines()
    reload = next(i for i, line in enumerate(lines) if "local config reloaded" in line)

    def trace(line):
        return line.split("inbound{id=")[1].split(" ")[0]

    taken = {trace(line): i for i, line in enumerate(lines) if "got CONNECT request to" in line}
    ended_ok = {trace(line) for line in lines if "inbound{id=" in line and "complete dur=" in line}
    refused = {trace(line) for line in lines if "inbound{id=" in line and "refused CONNECT with 401" in line}
    after = {t for t, i in taken.items() if i > reload}
    assert len(after) >= 20, len(after)  # the change came while connections were streaming in
    assert after <= refused and not after & ended_ok
    assert len(taken) == total
    assert len(ended_ok) <= out["ok"] <= len(ended_ok) + 4 and len(ended_ok) >= 50, (out, len(ended_ok))
    stats = inbound_stats(lab, zb)
    if engine == "native":
        assert stats[0] >= 50 and stats[2] >= 1, stats
    else:
        assert stats is None


def test_the_destination_leaving_the_config_stops_the_workers_answering(lab, engine):
    """Connections stream in while the destination's own workload leaves its ztunnel's config:
    from the reload line on, every CONNECT is refused (503, no local workload) by the event loop's
    path; none is answered from the flushed verdict, and every payload that completed is intact."""
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    # the client's ztunnel keeps the first config: only the destination's decisions change
    frozen = lab.workdir / "client-config.yaml"
    frozen.write_text(lab.config_path.read_text())
    lab.start_ztunnel(a, LOCAL_XDS_PATH=str(frozen))
    zb = lab.start_ztunnel(b, redirect=False, **FAST)
    total = 2000
    proc, out_path = lab.client_background(a, "echo", b.ip, "80", "--size", "500", "--count", str(total),
                                           "--concurrency", "4")
    deadline = time.monotonic() + 60
    while len(zb.lines("complete dur=")) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    del lab.pods[b.name]
    _publish(lab, [])
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = _report(out_path)
    assert out["ok"] + out["failed"] == total and out["mismatched"] == 0, out
    lines = zb.log().splitlines()
    reload = next(i for i, line in enumerate(lines) if "local config reloaded" in line)
    after = lines[reload + 1:]
    assert not [x for x in after if "got CONNECT request to" in x]
    refused = [x for x in after if "refused CONNECT with 503" in x and "no local workload" in x]
    assert len(refused) >= 20 and out["failed"] >= len(refused), (len(refused), out)
    assert len([x for x in lines[:reload] if "got CONNECT request to" in x]) >= 60
    stats = inbound_stats(lab, zb)
    if engine == "native":
        assert stats[0] >= 50 and stats[2] >= 1, stats
    else:
        assert stats is None


def test_3000_short_connections_hash_checked(lab, engine):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    lab.start_ztunnel(a)
    zb = lab.start_ztunnel(b, redirect=False, **FAST)
    n = 3000
    out = lab.client(a, "echo", b.ip, "80", "--size", "1024", "--count", str(n), "--concurrency", "30", timeout=300)
    assert out["ok"] == n and out["failed"] == 0 and out["mismatched"] == 0, out
    assert len(wait_lines(zb, "complete dur=", n, timeout=30)) == n
    assert len(zb.lines("got CONNECT request to")) == n
    m = metrics(lab, b)
    assert [v for (name, _), v in m.items() if name == "istio_tcp_connections_closed_total"] == [n]
    assert sum(v for (name, _), v in m.items() if name == "istio_tcp_received_bytes_total") == n * 1024
    assert sum(v for (name, _), v in m.items() if name == "istio_tcp_sent_bytes_total") == n * 1024
    stats = inbound_stats(lab, zb)
    if engine == "native":
        answered, handed, _ = stats
        assert answered >= n * 9 // 10 and handed == 0, stats
    else:
        assert stats is None


def test_shared_mode_answers_each_destination_workload_as_itself(lab, engine):
    """Node mode: the node's ztunnel (switch on) serves two workloads; a client connects to each in
    turn.  Each destination's CONNECTs arrive on a TLS connection of its own certificate, so each
    is a class of its own: the warm ones are the workers', and every tunnel reaches the workload
    it named, with that workload's labels, in order."""
    from .test_shared_mode import node_mesh

    node, w1, w2, sleep, zs, zn = node_mesh(lab, **FAST)
    for _ in range(3):
        for w in (w1, w2):
            out = lab.client(sleep, "echo", w.ip, "80", "--size", "4096", "--count", "4")
            assert out["ok"] == 4 and out["mismatched"] == 0, out
    got = zn.lines("got CONNECT request to")
    assert [line.rsplit(" ", 1)[1].rsplit(":", 1)[0] for line in got] == ([w1.ip] * 4 + [w2.ip] * 4) * 3
    wait_lines(zn, "connection complete", 24)
    access = access_lines(zn, "inbound")
    assert [a["dst.workload"] for a in access] == (["w1"] * 4 + ["w2"] * 4) * 3
    stats = inbound_stats(lab, zn)
    if engine == "native":
        assert stats[0] == 24 - 2 and stats[1] == 0, stats  # cold: the first CONNECT to each workload
    else:
        assert stats is None
