"""The inbound fast path (ZTUNNEL_FAST_PATH on the destination's ztunnel): native workers answer
the peer's CONNECTs of classes the event loop allowed once (dial the app, 200, splice); the pure twin
ignores the switch and keeps today's path.  Whatever path answers a CONNECT, the outcome, the logs,
the access log and the metrics (reporter=destination) must be the same: cases run with the switch
on and off, cold and warm, on both engines.
"""

from __future__ import annotations

import pytest

from . import fastpath_support as fp

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("fast", [False, True], ids=["fast-off", "fast-on"])
def test_sequential_connects_hash_checked_with_the_same_logs_and_metrics(lab, engine, fast):
    """40 connections one after the other through one HBONE connection: the first is the event
    loop's (it installs the class), the rest the workers'.  Each carries its own trace id from the
    client to the server's lines; the access log lines and metrics are those of the event loop's
    path."""
    a, b, za, zb = fp.two_pods(lab, server_env=fp.FAST if fast else fp.SLOW)
    n = 40
    _, got, access, m = fp.sequential_hash_checked(lab, a, b, za, zb, n, seen_by="server")
    assert all(f"peer_ip={a.ip} peer_id=spiffe://cluster.local/ns/demo/sa/sleep}}" in line for line in got)
    assert access[0]["src.workload"] == "sleep" and access[0]["dst.workload"] == "httpbin", access[0]
    opened = [dict(labels) for (name, labels) in m if name == "istio_tcp_connections_opened_total"]
    assert opened[0]["reporter"] == "destination"
    assert sum(fp.metric_values(m, "istio_tcp_received_bytes_total")) == n * 3000
    stats = fp.expect_counters(fp.inbound_stats(lab, zb), engine, fast)
    if stats is not None:
        answered, handed, _ = stats
        assert answered == n - 1 and handed == 0, stats  # cold: the first one installs the class


DENY_PORT_81 = {"name": "deny-81", "namespace": "demo", "scope": "Namespace", "action": "Deny",
                "rules": [[[{"principals": [{"Exact": "cluster.local/ns/demo/sa/sleep"}], "destinationPorts": [81]}]]]}


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
    fp.publish(lab, [DENY_PORT_81])
    for s in servers:
        lab.app(s, "serve", "80", "echo", port=80)
        lab.app(s, "serve", "81", "echo", port=81)
    lab.start_ztunnel(a)
    zts = {"alpha": lab.start_ztunnel(servers[0], redirect=False, **fp.FAST),
           "bravo": lab.start_ztunnel(servers[1], redirect=False, **fp.SLOW)}
    results = {}
    for s in servers:
        zt = zts[s.name]
        cases = [("allowed", s.ip, "80"), ("denied", s.ip, "81"), ("refused", s.ip, "82"),
                 ("service", vips[s.name], "80")]
        outcome = fp.run_cases(lab, a, cases)
        fp.wait_lines(zt, "connection complete", 16)
        failed = [line.split("err=", 1)[1] for line in zt.lines("failed dur=")]
        seen = fp.view(lab, zt, s, "inbound", got=fp.after_span(zt.lines("got CONNECT request to")),
                       refused=fp.after_span(zt.lines("refused CONNECT")), failed=failed)
        results[s.name] = (outcome, seen, fp.inbound_stats(lab, zt))
    (f_outcome, f_view, f_stats), (s_outcome, s_view, s_stats) = results["alpha"], results["bravo"]
    assert f_outcome == s_outcome
    assert [o[2:] for o in f_outcome] == [(1, 0), (3, 0), (0, 1), (0, 3), (0, 1), (0, 3), (1, 0), (3, 0)]
    fp.assert_same(f_view, s_view)
    access, got, refused = f_view["access"], f_view["got"], f_view["refused"]
    assert len(access) == 16 and len(got) == 16 and len(refused) == 8, (access, got, refused)
    assert sum("401" in x for x in refused) == 4 and sum("failed to connect to POD-IP:82" in x for x in refused) == 4
    # the service labels
    assert any("echo-POD.demo.svc.cluster.local" in x for x in f_view["metrics"]), f_view["metrics"]
    assert s_stats is None
    stats = fp.expect_counters(f_stats, engine)
    if stats is not None:
        # warm allowed (3) and every service connection (4) by the workers; warm refused dials handed back (3)
        assert stats[:2] == (7, 3), stats


def test_a_policy_change_racing_connects_lets_no_denied_one_through(lab, engine):
    """Connections stream in (4 at a time) while a policy that denies the client is published to
    the destination's ztunnel, whose workers answer the warm ones.  Each CONNECT is checked against
    the policy in force when the destination took it (its `got CONNECT` line before or after the
    reload line): every one after it is refused, none reaches the app; those before either
    completed or were closed by the change; every payload that completed is intact."""
    a, b, _, zb = fp.two_pods(lab, server_env=fp.FAST)
    total = 1000
    out = fp.race(lab, a, b.ip, zb, lambda: fp.publish(lab, [fp.DENY_CLIENT]), total=total)
    fp.assert_no_connect_after_deny(zb, out, total)
    stats = fp.expect_counters(fp.inbound_stats(lab, zb), engine)
    if stats is not None:
        assert stats[0] >= 50 and stats[2] >= 1, stats


def test_the_destination_leaving_the_config_stops_the_workers_answering(lab, engine):
    """Connections stream in while the destination's own workload leaves its ztunnel's config:
    from the reload line on, every CONNECT is refused (503, no local workload) by the event loop's
    path; none is answered from the flushed verdict, and every payload that completed is intact."""
    # the client's ztunnel keeps the first config: only the destination's decisions change
    a, b, _, zb = fp.two_pods(lab, server_env=fp.FAST, frozen="client")
    total = 2000

    def leave():
        del lab.pods[b.name]
        fp.publish(lab, [])

    out = fp.race(lab, a, b.ip, zb, leave, total=total)
    assert out["ok"] + out["failed"] == total and out["mismatched"] == 0, out
    lines = zb.log().splitlines()
    reload = next(i for i, line in enumerate(lines) if "local config reloaded" in line)
    after = lines[reload + 1:]
    assert not [x for x in after if "got CONNECT request to" in x]
    refused = [x for x in after if "refused CONNECT with 503" in x and "no local workload" in x]
    assert len(refused) >= 20 and out["failed"] >= len(refused), (len(refused), out)
    assert len([x for x in lines[:reload] if "got CONNECT request to" in x]) >= 60
    stats = fp.expect_counters(fp.inbound_stats(lab, zb), engine)
    if stats is not None:
        assert stats[0] >= 50 and stats[2] >= 1, stats


def test_3000_short_connections_hash_checked(lab, engine):
    a, b, _, zb = fp.two_pods(lab, server_env=fp.FAST)
    n = 3000
    fp.many_short_hash_checked(lab, a, b.ip, n, concurrency=30, done_on=zb, got_on=zb, pod=b, timeout=300)
    stats = fp.expect_counters(fp.inbound_stats(lab, zb), engine)
    if stats is not None:
        answered, handed, _ = stats
        assert answered >= n * 9 // 10 and handed == 0, stats


def test_shared_mode_answers_each_destination_workload_as_itself(lab, engine):
    """Node mode: the node's ztunnel (switch on) serves two workloads; a client connects to each in
    turn.  Each destination's CONNECTs arrive on a TLS connection of its own certificate, so each
    is a class of its own: the warm ones are the workers', and every tunnel reaches the workload
    it named, with that workload's labels, in order."""
    from .test_shared_mode import node_mesh

    _, w1, w2, sleep, _, zn = node_mesh(lab, **fp.FAST)
    for _ in range(3):
        for w in (w1, w2):
            out = lab.client(sleep, "echo", w.ip, "80", "--size", "4096", "--count", "4")
            assert out["ok"] == 4 and out["mismatched"] == 0, out
    got = zn.lines("got CONNECT request to")
    assert [line.rsplit(" ", 1)[1].rsplit(":", 1)[0] for line in got] == ([w1.ip] * 4 + [w2.ip] * 4) * 3
    fp.wait_lines(zn, "connection complete", 24)
    access = fp.access_lines(zn, "inbound")
    assert [a["dst.workload"] for a in access] == (["w1"] * 4 + ["w2"] * 4) * 3
    stats = fp.expect_counters(fp.inbound_stats(lab, zn), engine)
    if stats is not None:
        assert stats[0] == 24 - 2 and stats[1] == 0, stats  # cold: the first CONNECT to each workload
