"""IPv6 on both fast paths (ZTUNNEL_FAST_PATH), dual-stack pods as Istio's ztunnel serves them: the
client's workers accept on its IPv6 outbound listener too (IP6T_SO_ORIGINAL_DST), the server's
workers answer the IPv6 CONNECTs (:authority "[addr]:port") and dial the app over IPv6.  The pure
twin ignores the switch: the same test on it is the reference path, and both must give the same
answers, bytes, lines, access log and metrics; on the native engine the workers must have carried
the connections (their counters).

Set-up: two pods of the Lab with an IPv6 address each beside their IPv4 one (`nodad`: usable at
once), both addresses in the workloads' `workloadIps`, the client's IPv4 and IPv6 outbound TCP
redirected to 15001 (iptables and ip6tables inside its namespace; they go with it).  The IPv6
addresses have two runs of zero groups, so their text ("fd00::1:0:0:a") is RFC 5952's choice
that the worker's `forwarded` must match.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ztunnel_fast import netns

from . import fastpath_support as fp

pytestmark = pytest.mark.e2e

V6 = {"sleep": "fd00::1:0:0:a", "httpbin": "fd00::1:0:0:b"}
REPO = Path(__file__).resolve().parents[2]
# client addresses whose RFC 5952 text exercises its rules: the first of two equal zero runs
# compressed, the longer of two, a trailing run, a lone zero group never compressed (last, first)
EXTRA_SOURCES = ["2001:db8::1:0:0:1", "2001:db8:0:1::1", "1:0:0:1::", "2001:db8:1:1:1:1:1:0", "0:1:2:3:4:5:6:7"]


def dual_stack_pods(lab, env: dict):
    """sleep (the client, IPv4 and IPv6 outbound redirected) and httpbin (an echo app on 80, both
    families), each with its own ztunnel-fast started with `env`: (a, b, za, zb)."""
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    for p in (a, b):
        lab.topology.run(p.pod, ["ip", "-6", "addr", "add", f"{V6[p.name]}/64", "dev", netns.Topology.POD_IF,
                                 "nodad"])
    cfg = lab.config()
    for w in cfg["workloads"]:
        w["workloadIps"].append(V6[w["name"]])
    lab.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a, **env)
    zb = lab.start_ztunnel(b, redirect=False, **env)
    # the IPv6 twin of netns.redirect_outbound (the mark: our own upstream sockets pass)
    lab.topology.run(a.pod, ["ip6tables-legacy", "-w", "10", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-o",
                             "lo", "-m", "mark", "!", "--mark", "0x539/0xfff", "-j", "REDIRECT", "--to-ports",
                             "15001"])
    return a, b, za, zb


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def test_ipv6_and_ipv4_flows_hash_checked_on_both_fast_paths(lab, engine):
    """n echo connections of 3000 bytes over IPv6, then n over IPv4, one after the other, both
    fast paths on: every payload intact, each connection's trace id from the client's `proxy to`
    line to the server's `got CONNECT`, access log lines and metrics as the event loop's path
    writes them (the pure engine's run is that path), and on the native engine the workers
    carried all but the first few of each family on both sides."""
    a, b, za, zb = dual_stack_pods(lab, fp.FAST)
    n = 20
    for family, (src, dst) in enumerate(((V6["sleep"], V6["httpbin"]), (a.ip, b.ip)), start=1):
        out = lab.client(a, "echo", dst, "80", "--size", "3000", "--count", str(n), "--concurrency", "1")
        assert out["ok"] == n and out["failed"] == 0 and out["mismatched"] == 0, out
        assert len(fp.wait_lines(za, "complete dur=", family * n)) == family * n
        assert len(fp.wait_lines(zb, "complete dur=", family * n)) == family * n
        proxy = za.lines(f"proxy to {_host(dst)}:80 using HBONE via {_host(dst)}:15008 type Direct")
        ids = {fp.trace_id(line, "outbound") for line in proxy}
        assert len(proxy) == n and len(ids) == n and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
        got = zb.lines(f"got CONNECT request to {_host(dst)}:80")
        assert len(got) == n and {fp.trace_id(line) for line in got} == ids
        assert all(f"peer_ip={src} peer_id=spiffe://cluster.local/ns/demo/sa/sleep}}" in line for line in got)
        for zt, direction in ((za, "outbound"), (zb, "inbound")):
            access = [x for x in fp.access_lines(zt, direction) if x["src.addr"] == _host(src)]
            assert len(access) == n and all(x == access[0] for x in access), access
            assert access[0]["bytes_sent"] == "3000" and access[0]["bytes_recv"] == "3000", access[0]
            assert access[0]["src.workload"] == "sleep" and access[0]["dst.workload"] == "httpbin", access[0]
            assert access[0]["dst.addr"] == f"{_host(dst)}:{15008 if direction == 'outbound' else 80}", access[0]
    for pod in (a, b):
        m = fp.metrics(lab, pod)
        assert fp.metric_values(m, "istio_tcp_connections_opened_total") == [2 * n], m
        assert fp.metric_values(m, "istio_tcp_connections_closed_total") == [2 * n], m
        assert sum(fp.metric_values(m, "istio_tcp_sent_bytes_total")) == 2 * n * 3000, m
    out_stats = fp.expect_counters(fp.outbound_stats(lab, za), engine)
    in_stats = fp.expect_counters(fp.inbound_stats(lab, zb), engine)
    if out_stats is not None:
        carried, event_loop, _ = out_stats
        # cold: the first connection of each family (and any before its HBONE connection is up)
        assert carried + event_loop == 2 * n and carried >= 2 * n - 10, out_stats
        answered, handed, _ = in_stats
        assert answered >= 2 * n - 10 and handed == 0, in_stats


def test_the_workers_connect_is_the_event_loops_for_both_families(lab, engine):
    """The CONNECTs as the peer decodes them (tests/e2e/hbone_recorder.py, an independent HBONE
    server with httpbin's identity in place of its ztunnel): per class (source address), the first
    connection is the event loop's (it installs the class), the rest the workers' on the native
    engine, all of them the event loop's on the pure one; every request of a family has the same
    fields in the same order, `forwarded` is for="<the client's address and port>" (IPv6 in
    brackets, the RFC 5952 text of Python's ipaddress: the client binds sources whose text tests
    its rules), `traceparent` carries the trace id of a `proxy to` line, the rest is equal."""
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    for p in (a, b):
        lab.topology.run(p.pod, ["ip", "-6", "addr", "add", f"{V6[p.name]}/64", "dev", netns.Topology.POD_IF,
                                 "nodad"])
    for src in EXTRA_SOURCES:  # more client addresses, off the /64: the server answers them on-link
        lab.topology.run(a.pod, ["ip", "-6", "addr", "add", f"{src}/128", "dev", netns.Topology.POD_IF, "nodad"])
    lab.topology.run(b.pod, ["ip", "-6", "route", "add", "default", "dev", netns.Topology.POD_IF])
    cfg = lab.config()
    for w in cfg["workloads"]:
        w["workloadIps"].append(V6[w["name"]])
    lab.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    chain, key, _ = lab.identity_files(b.identity, "httpbin")
    n, m = 8, 3  # connections of the main classes, of each extra source's
    cases = [(V6["sleep"], V6["httpbin"], n)] + [(s, V6["httpbin"], m) for s in EXTRA_SOURCES] + [(a.ip, b.ip, n)]
    total = sum(c for _, _, c in cases)
    records = lab.workdir / "connects.jsonl"
    log = open(lab.workdir / "recorder.out", "wb")
    recorder = lab.topology.popen(b.pod, [sys.executable, "-m", "tests.e2e.hbone_recorder", "--chain", str(chain),
                                          "--key", str(key), "--out", str(records), "--count", str(total),
                                          "--timeout", "120"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        netns.wait_listening(b.pod, 15008)
        za = lab.start_ztunnel(a, **fp.FAST)
        lab.topology.run(a.pod, ["ip6tables-legacy", "-w", "10", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-o",
                                 "lo", "-m", "mark", "!", "--mark", "0x539/0xfff", "-j", "REDIRECT", "--to-ports",
                                 "15001"])
        done = 0
        for src, dst, count in cases:
            out = lab.client(a, "echo", dst, "80", "--size", "1000", "--count", str(count), "--concurrency", "1",
                             "--source", src)
            assert out["ok"] == count and out["failed"] == 0 and out["mismatched"] == 0, (src, out)
            done += count
            lines = fp.wait_lines(za, "connection complete", done)
            assert len(lines) == done
            ports = sorted(int(p) for p in re.findall(rf"src\.addr={re.escape(_host(src))}:(\d+)", "\n".join(lines)))
            assert len(ports) == count, (src, lines)
            forwarded = sorted(dict(r["headers"])["forwarded"] for r in _json_lines(records)
                               if dict(r["headers"])["forwarded"].startswith(f'for="{_host(src)}:'))
            assert forwarded == sorted(f'for="{_host(src)}:{port}"' for port in ports), (forwarded, ports)
        got = [r["headers"] for r in _json_lines(records)]
        assert len(got) == total
        for dst in (V6["httpbin"], b.ip):
            family = [h for h in got if dict(h)[":authority"] == f"{_host(dst)}:80"]
            assert len(family) == total - n if ":" in dst else n
            assert all([f[0] for f in h] == [":method", ":authority", "forwarded", "traceparent", "baggage"]
                       for h in family), family
            assert all([f for f in h if f[0] not in ("forwarded", "traceparent")]
                       == [f for f in family[0] if f[0] not in ("forwarded", "traceparent")] for h in family), family
        trace_ids = sorted(fp.trace_id(line, "outbound") for line in za.lines("using HBONE via"))
        assert sorted(dict(h)["traceparent"].split("-")[1] for h in got) == trace_ids
        stats = fp.expect_counters(fp.outbound_stats(lab, za), engine)
        if stats is not None:
            carried, event_loop, _ = stats
            assert carried + event_loop == total and carried >= total - 2 * len(cases), stats
    finally:
        lab.topology.stop(recorder)
