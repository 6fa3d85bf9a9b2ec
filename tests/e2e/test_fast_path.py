"""The outbound fast path (ZTUNNEL_FAST_PATH): native workers accept 15001 and carry the flows the
event loop decided once; the pure twin ignores the switch and keeps today's path.  Whatever path
carries a connection, the outcome, the logs, the access log and the metrics must be the same:
every case runs with the fast path on and off, cold and warm, on both engines.
"""

from __future__ import annotations

import signal
import time

import pytest

from ztunnel_fast import netns

from . import fastpath_support as fp

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("fast", [False, True], ids=["fast-off", "fast-on"])
def test_sequential_connections_hash_checked_with_the_same_logs_and_metrics(lab, engine, fast):
    a, b, za, zb = fp.two_pods(lab, client_env=fp.FAST if fast else fp.SLOW)
    n = 40
    fp.sequential_hash_checked(lab, a, b, za, zb, n, seen_by="client")
    stats = fp.expect_counters(fp.outbound_stats(lab, za), engine, fast)
    if stats is not None:
        carried, event_loop, _ = stats
        assert carried + event_loop == n and carried >= n - 5, stats  # cold: the first few


def test_every_routing_and_policy_case_agrees_cold_and_warm(lab, engine):
    """The same cases from a client whose ztunnel has the fast path on and one whose ztunnel has it
    off: HBONE to a workload (cached), a destination whose policy denies us (401 from the peer:
    never cached), plain TCP to a non-mesh workload, a service VIP (round robin: never
    cached), an unknown address (passthrough).  Each runs cold (one connection) then warm (three):
    the outcomes, access log lines and metrics (client name and IP aside) must be equal."""
    fast = lab.pod("speedy", namespace="demo")
    slow = lab.pod("steady", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    b2 = lab.pod("httpbin-2", namespace="demo")
    locked = lab.pod("locked", namespace="locked")
    legacy = lab.pod("legacy", namespace="demo", mesh=False)
    stranger = lab.pod("stranger", workload=False)
    vip = "10.96.0.10"
    lab.service("echo", "demo", vip, {80: 80}, [b, b2])
    fp.publish(lab, [{"name": "deny-clients", "namespace": "locked", "scope": "Namespace", "action": "Deny",
                      "rules": [[[{"principals": [{"Exact": "cluster.local/ns/demo/sa/speedy"},
                                                  {"Exact": "cluster.local/ns/demo/sa/steady"}]}]]]}])
    for server in (b, b2, locked, legacy, stranger):
        lab.app(server, "serve", "80", "echo", port=80)
    zf = lab.start_ztunnel(fast, **fp.FAST)
    zs = lab.start_ztunnel(slow, **fp.SLOW)
    for server in (b, b2, locked):
        lab.start_ztunnel(server, redirect=False)
    cases = [("hbone", b.ip, "80"), ("denied", locked.ip, "80"), ("plain", legacy.ip, "80"),
             ("service", vip, "80"), ("passthrough", stranger.ip, "80")]
    results = {}
    for client, zt in ((fast, zf), (slow, zs)):
        outcome = fp.run_cases(lab, client, cases)
        fp.wait_lines(zt, "connection complete", 20)
        proxy = [line for line in zt.lines(" to ") if "outbound{" in line and "proxy" in line]
        failed = [line.split("err=", 1)[1] for line in zt.lines("failed dur=")]
        seen = fp.view(lab, zt, client, "outbound", proxy=fp.after_span(proxy), failed=failed)
        results[client.name] = (outcome, seen, fp.outbound_stats(lab, zt))
    (f_outcome, f_view, f_stats), (s_outcome, s_view, s_stats) = results["speedy"], results["steady"]
    assert f_outcome == s_outcome
    assert [o[2:] for o in f_outcome] == [(1, 0), (3, 0), (0, 1), (0, 3), (1, 0), (3, 0), (1, 0), (3, 0), (1, 0),
                                          (3, 0)]
    fp.assert_same(f_view, s_view)
    assert len(f_view["access"]) == 20 and len(f_view["proxy"]) == 20
    assert len(f_view["failed"]) == 4 and all("http status: 401" in x for x in f_view["failed"])
    assert s_stats is None
    stats = fp.expect_counters(f_stats, engine)
    if stats is not None:
        carried, event_loop, _ = stats
        # the warm direct HBONE connections are the workers'; the rest the event loop's (a class is
        # learned on the pooled connection that answered its CONNECT 200: the denied one never is)
        assert (carried, event_loop) == (3, 17), stats


@pytest.mark.parametrize("change", ["leaves-mesh", "removed"])
def test_a_state_change_racing_new_connections_invalidates_the_cache(lab, engine, change):
    """Connections stream in (4 at a time) while the destination leaves the mesh (plain TCP from
    now on) or leaves the config (passthrough).  The cached HBONE decision is flushed before the
    change applies: after the reload line only the connections already accepted (at most the
    client's 4 in flight) may still be HBONE, every later one takes the new route, and every
    payload is intact."""
    # the destination's ztunnel keeps the first config: only the client's decisions change
    a, b, za, zb = fp.two_pods(lab, client_env=fp.FAST, frozen="server")
    warm = lab.client(a, "echo", b.ip, "80", "--size", "100", "--count", "3")
    assert warm["ok"] == 3, warm
    total = 400

    def change_it():
        if change == "leaves-mesh":
            b.mesh = False
        else:
            del lab.pods[b.name]
        fp.publish(lab)

    out = fp.race(lab, a, b.ip, za, change_it, total=total, after=3 + 60)
    assert out["ok"] == total and out["failed"] == 0 and out["mismatched"] == 0, out
    lines = za.log().splitlines()
    reloads = [i for i, line in enumerate(lines) if "local config reloaded" in line]
    assert reloads, za.log()[-3000:]
    before, after = lines[:reloads[0]], lines[reloads[0] + 1:]
    new_route = "type Direct" if change == "leaves-mesh" else "type Passthrough"
    hbone_after = [line for line in after if f"proxy to {b.ip}:80 using HBONE" in line]
    plain_after = [line for line in after if f"proxy to {b.ip}:80 using TCP via {b.ip}:80 {new_route}" in line]
    assert len(hbone_after) <= 4, hbone_after
    assert len(hbone_after) + len(plain_after) == len([x for x in after if f"proxy to {b.ip}:80 using" in x])
    assert len(plain_after) >= 20  # the change came while connections were still streaming in
    assert len([x for x in before if "using HBONE" in x]) >= 3 + 60
    assert len(zb.lines("got CONNECT request to")) == len([x for x in lines if "using HBONE" in x])
    stats = fp.expect_counters(fp.outbound_stats(lab, za), engine)
    if stats is not None:
        carried, event_loop, flushes = stats
        assert flushes >= 1 and carried >= 50 and carried + event_loop == total + 3, stats


def test_10000_short_connections_hash_checked(lab, engine):
    a, b, za, zb = fp.two_pods(lab, client_env=fp.FAST)
    n = 10_000
    fp.many_short_hash_checked(lab, a, b.ip, n, concurrency=50, done_on=za, got_on=zb, pod=a, timeout=600)
    stats = fp.expect_counters(fp.outbound_stats(lab, za), engine)
    if stats is not None:
        carried, event_loop, _ = stats
        assert carried + event_loop == n and carried >= n * 9 // 10, stats


def test_tunnels_beyond_a_connections_stream_limit_ride_another_connection(lab, engine):
    """More tunnels held open to one destination than one HBONE connection may carry
    (POOL_MAX_STREAMS_PER_CONNECTION, lowered to keep it cheap): the key gets another connection
    whenever its current one is full (the pool's rule, and the fast path's: a worker that finds the
    connection full hands the tunnel back and says so, the next decision dials another connection
    and the key's entries move onto it), so new connections keep riding the workers.  Worker
    connections (ZTUNNEL_FAST_PATH_HANDOVER_RATE=1: a worker's first hand-over gets it its own)
    fill up too: a full one leaves the class until it has room.  Every held tunnel and every short
    connection is intact; the lines and metrics count each once."""
    limit, holding, n, size = 8, 20, 300, 4096
    a, b, za, zb = fp.two_pods(lab, client_env={**fp.FAST, "POOL_MAX_STREAMS_PER_CONNECTION": str(limit),
                                                "ZTUNNEL_FAST_PATH_HANDOVER_RATE": "1"})
    with fp.held_tunnels(lab, a, b.ip, holding, size=size) as held:
        assert held.established == holding, held.output()
        out = lab.client(a, "echo", b.ip, "80", "--size", "1024", "--count", str(n), "--concurrency", "4")
        assert out["ok"] == n and out["failed"] == 0 and out["mismatched"] == 0, out
        assert len(fp.wait_lines(za, "complete dur=", n, timeout=30)) == n  # the held ones are still open
        m = fp.metrics(lab, a)
        assert fp.metric_values(m, "istio_tcp_connections_opened_total") == [holding + n], m
        assert fp.metric_values(m, "istio_tcp_connections_closed_total") == [n], m
        done = held.release()
    assert done["ok"] == holding and done["failed"] == 0 and done["mismatched"] == 0, done
    assert len(fp.wait_lines(za, "complete dur=", holding + n, timeout=30)) == holding + n
    proxy = za.lines(f"proxy to {b.ip}:80 using HBONE via {b.ip}:15008 type Direct")
    assert len(proxy) == holding + n
    assert len(zb.lines(f"got CONNECT request to {b.ip}:80")) == holding + n
    access = fp.access_lines(za)
    assert len(access) == holding + n and not [x for x in access if "error" in x], access[:3]
    assert sorted(x["bytes_sent"] for x in access) == sorted(["1024"] * n + [str(4 + size)] * holding)
    m = fp.metrics(lab, a)
    assert fp.metric_values(m, "istio_tcp_connections_closed_total") == [holding + n], m
    assert sum(fp.metric_values(m, "istio_tcp_sent_bytes_total")) == n * 1024 + holding * (4 + size), m
    assert sum(fp.metric_values(m, "istio_tcp_received_bytes_total")) == n * 1024 + holding * (4 + size), m
    stats = fp.expect_counters(fp.outbound_stats(lab, za), engine)
    if stats is not None:
        carried, event_loop, _ = stats
        # one connection per key would carry `limit` and hand every later one back
        assert carried + event_loop == holding + n and carried >= n // 2, stats


def test_a_worker_that_hands_a_class_over_gets_a_connection_of_its_own(lab, engine):
    """ZTUNNEL_FAST_PATH_HANDOVER_RATE=1: the first time a worker hands a class over to the worker
    that owns its HBONE connection, the pool dials a connection that worker owns, and the class's
    later tunnels accepted there ride it.  2,000 short connections, 50 at a time (so both workers
    accept), every one intact; the destination answers every CONNECT; two connections at most with
    two workers, the second one said to be a worker's; the pure twin (no workers) keeps one."""
    n = 2000
    a, b, za, zb = fp.two_pods(lab, client_env={**fp.FAST, "ZTUNNEL_FAST_PATH_HANDOVER_RATE": "1",
                                                "RUST_LOG": "info,ztunnel_fast::proxy::outbound=debug"})
    fp.many_short_hash_checked(lab, a, b.ip, n, concurrency=50, done_on=za, got_on=zb, pod=a, timeout=300)
    dialled = za.lines(f"new HBONE connection to {b.ip}:15008")
    own = [line for line in dialled if ", owned by worker " in line]
    stats = fp.expect_counters(fp.outbound_stats(lab, za), engine)
    if stats is None:
        assert len(dialled) == 1 and not own, dialled
        return
    carried, event_loop, _ = stats
    assert carried + event_loop == n and carried >= n * 9 // 10, stats
    assert len(dialled) == 2 and len(own) == 1, dialled  # the pool's, then the other worker's own
    assert int(own[0].rsplit(" ", 1)[1]) in (0, 1), own  # a worker of the two


def test_a_lost_fast_path_connection_hands_over_and_is_replaced(lab, engine):
    """The destination's ztunnel restarts: the fast path's HBONE connection dies under it; later
    connections miss, take the event loop's path (which dials anew and installs the class on a new
    connection), then ride the fast path again.  Every one after the restart is intact."""
    a, b, za, zb = fp.two_pods(lab, client_env=fp.FAST)
    assert lab.client(a, "echo", b.ip, "80", "--size", "100", "--count", "5")["ok"] == 5
    lab.stop_ztunnel(zb)  # drains: GOAWAY on its HBONE connections, then closes them
    zb2 = lab.start_ztunnel(b, redirect=False, wait=False)
    netns.wait_listening(b.pod, 15008)  # its log (appended to) already holds the first one's ready line
    out = lab.client(a, "echo", b.ip, "80", "--size", "2000", "--count", "30")
    assert out["ok"] == 30 and out["mismatched"] == 0, out
    assert len(zb2.lines("got CONNECT request to")) == 5 + 30  # the log holds both instances' lines
    stats = fp.expect_counters(fp.outbound_stats(lab, za), engine)
    if stats is not None:
        carried, event_loop, _ = stats
        assert carried + event_loop == 35 and carried >= 25, stats  # warm before and after the restart


def test_a_policy_change_racing_new_connections_lets_no_denied_one_through(lab, engine):
    """Connections stream in (4 at a time, through the client's fast path) while a policy that
    denies the client is published.  Each CONNECT is checked against the policy in force when the
    destination's ztunnel took it (its `got CONNECT` line before or after its reload line): every
    one after the reload is refused, none reaches the app; the ones before either completed or
    were closed by the change; every payload that completed is intact."""
    a, b, za, zb = fp.two_pods(lab, client_env=fp.FAST)
    total = 400
    out = fp.race(lab, a, b.ip, za, lambda: fp.publish(lab, [fp.DENY_CLIENT]), total=total)
    fp.assert_no_connect_after_deny(zb, out, total)
    stats = fp.expect_counters(fp.outbound_stats(lab, za), engine)
    if stats is not None:
        assert stats[0] >= 50, stats


def test_shared_mode_keeps_each_source_workload_on_its_own_identity(lab, engine):
    """Node mode: two workloads of the node connect to the same destination; the flow class holds
    the source IP, so each one's connections ride an HBONE connection of its own identity, cold
    and warm, and the destination sees who really connected."""
    from .test_shared_mode import node_mesh

    node, w1, w2, sleep, zs, zn = node_mesh(lab, **fp.FAST)
    for round_ in range(3):
        for w in (w1, w2):
            out = lab.client(node, "echo", sleep.ip, "80", "--size", "4096", "--count", "4", "--source", w.ip)
            assert out["ok"] == 4 and out["mismatched"] == 0, out
    got = zs.lines("got CONNECT request")
    assert len(got) == 24
    ids = {sa: sum(f"peer_id=spiffe://cluster.local/ns/demo/sa/{sa}}}" in line for line in got) for sa in ("s1", "s2")}
    assert ids == {"s1": 12, "s2": 12}
    # and in the order they connected: the source of every tunnel is the workload that opened it
    access = fp.access_lines(zn)
    assert [a["src.workload"] for a in access] == (["w1"] * 4 + ["w2"] * 4) * 3
    stats = fp.expect_counters(fp.outbound_stats(lab, zn), engine)
    if stats is not None:
        assert stats[0] >= 20 and stats[0] + stats[1] == 24, stats


@pytest.mark.parametrize("side", ["client", "server"])
def test_drain_waits_for_fast_path_tunnels_then_resets_them(lab, engine, side):
    """A tunnel still moving bytes at the drain deadline (carried by the workers once its class is
    warm) is waited for, then closed: the access log says so as the event loop's path does."""
    deadline_env = {"CONNECTION_TERMINATION_DEADLINE": "1s"}
    a, b, za, zb = fp.two_pods(lab, client_env={**fp.FAST, **(deadline_env if side == "client" else {})},
                               server_env={**fp.FAST, **(deadline_env if side == "server" else {})})
    assert lab.client(a, "echo", b.ip, "80", "--size", "100", "--count", "3")["ok"] == 3  # warm
    proc, _ = lab.client_background(a, "echo", b.ip, "80", "--size", str(400 * 1000 * 1000),
                                    "--chunk-delay", "0.004")
    try:
        assert len(fp.wait_lines(zb, "got CONNECT request to", 4, timeout=20)) == 4
        time.sleep(0.3)
        zt = za if side == "client" else zb
        zt.proc.send_signal(signal.SIGTERM)
        assert zt.proc.wait(timeout=30) == 0
        assert zt.lines("drain deadline reached: closing ")
        direction = "outbound" if side == "client" else "inbound"
        access = fp.access_lines(zt, direction)
        assert len(access) == 4, access
        assert [x.get("error") for x in access] == [None] * 3 + ['"connection closed due to drain"'], access
        if engine == "native":  # the drained tunnel rode the fast path
            said = "connections carried by the workers" if side == "client" else "CONNECTs answered by the workers"
            stats = [int(line.split(" " + said)[0].rsplit(" ", 1)[1]) for line in zt.lines(said)]
            assert stats and stats[-1] >= 1, stats  # cold: the first of a class takes the event loop's path
    finally:
        proc.kill()
        proc.wait(timeout=10)
