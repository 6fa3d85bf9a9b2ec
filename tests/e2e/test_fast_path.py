"""The outbound fast path (ZTUNNEL_FAST_PATH): native workers accept 15001 and carry the flows the
event loop decided once; the pure twin ignores the switch and keeps today's path.  Whatever path
carries a connection, the outcome, the logs, the access log and the metrics must be the same:
every case runs with the fast path on and off, cold and warm, on both engines.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_fast import netns

pytestmark = pytest.mark.e2e

FAST = {"ZTUNNEL_FAST_PATH": "true"}
STATS = re.compile(r"fast path: (\d+) connections carried by the workers, (\d+) by the event loop's path, (\d+) flushes")


def metrics(lab, pod) -> dict[tuple, float]:
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


def fast_stats(lab, zt) -> tuple[int, int, int] | None:
    """(carried by the workers, by the event loop, flushes) from the line drain logs; None: no fast path."""
    lab.stop_ztunnel(zt)
    found = [STATS.search(line) for line in zt.lines("fast path: ")]
    found = [m for m in found if m]
    return tuple(int(g) for g in found[-1].groups()) if found else None


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


def two_pods(lab, client_env):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a, **client_env)
    zb = lab.start_ztunnel(b, redirect=False)
    return a, b, za, zb


@pytest.mark.parametrize("fast", [False, True], ids=["fast-off", "fast-on"])
def test_sequential_connections_hash_checked_with_the_same_logs_and_metrics(lab, engine, fast):
    a, b, za, zb = two_pods(lab, FAST if fast else {})
    n = 40
    out = lab.client(a, "echo", b.ip, "80", "--size", "3000", "--count", str(n), "--concurrency", "1")
    assert out["ok"] == n and out["failed"] == 0, out
    deadline = time.monotonic() + 10
    while len(za.lines("complete dur=")) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(za.lines("complete dur=")) == n
    proxy = za.lines(f"proxy to {b.ip}:80 using HBONE via {b.ip}:15008 type Direct")
    assert len(proxy) == n
    ids = {line.split("outbound{id=")[1].split("}")[0] for line in proxy}
    assert len(ids) == n and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # the server saw each connection's trace id and the client's address in forwarded
    got = zb.lines(f"got CONNECT request to {b.ip}:80")
    assert len(got) == n
    assert {line.split("inbound{id=")[1].split(" ")[0] for line in got} == ids
    access = access_lines(za)
    assert len(access) == n and all(x == access[0] for x in access)
    assert access[0]["bytes_sent"] == "3000" and access[0]["bytes_recv"] == "3000", access[0]
    m = metrics(lab, a)
    opened = [v for (name, labels), v in m.items() if name == "istio_tcp_connections_opened_total"]
    closed = [v for (name, labels), v in m.items() if name == "istio_tcp_connections_closed_total"]
    assert opened == [n] and closed == [n], m
    stats = fast_stats(lab, za)
    if fast and engine == "native":
        carried, event_loop, _ = stats
        assert carried + event_loop == n and carried >= n - 5, stats  # cold: the first few
    else:
        assert stats is None


def _normalize(value, client) -> str:
    return str(value).replace(client.ip, "CLIENT-IP").replace(client.name, "CLIENT")


def test_every_routing_and_policy_case_agrees_cold_and_warm(lab, engine):
    """The same cases from a client whose ztunnel has the fast path on and one whose ztunnel has it
    off: HBONE to a workload (cached), a destination whose policy denies us (401, cached then
    refused by the peer), plain TCP to a non-mesh workload, a service VIP (round robin: never
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
    lab.write_config()
    import yaml

    cfg = yaml.safe_load(lab.config_path.read_text())
    cfg["policies"] = [{"name": "deny-clients", "namespace": "locked", "scope": "Namespace", "action": "Deny",
                        "rules": [[[{"principals": [{"Exact": "cluster.local/ns/demo/sa/speedy"},
                                                    {"Exact": "cluster.local/ns/demo/sa/steady"}]}]]]}]
    lab.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for server in (b, b2, locked, legacy, stranger):
        lab.app(server, "serve", "80", "echo", port=80)
    zf = lab.start_ztunnel(fast, **FAST)
    zs = lab.start_ztunnel(slow)
    for server in (b, b2, locked):
        lab.start_ztunnel(server, redirect=False)
    cases = [("hbone", b.ip), ("denied", locked.ip), ("plain", legacy.ip), ("service", vip),
             ("passthrough", stranger.ip)]
    results = {}
    for client, zt in ((fast, zf), (slow, zs)):
        outcome = []
        for name, ip in cases:
            for count in (1, 3):  # cold, then warm
                out = lab.client(client, "echo", ip, "80", "--size", "777", "--count", str(count))
                outcome.append((name, count, out["ok"], out["failed"]))
        deadline = time.monotonic() + 10
        while len(zt.lines("connection complete")) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        access = sorted(sorted((k, _normalize(v, client)) for k, v in fields.items()) for fields in access_lines(zt))
        m = sorted((name, tuple((k, _normalize(v, client)) for k, v in labels), v)
                   for (name, labels), v in metrics(lab, client).items())
        proxy = sorted(_normalize(line.split("}", 1)[1], client) for line in zt.lines(" to ") if "outbound{" in line and "proxy" in line)
        failed = sorted(_normalize(line.split("err=", 1)[1], client) for line in zt.lines("failed dur="))
        results[client.name] = (outcome, access, m, proxy, failed, fast_stats(lab, zt))
    f, s = results["speedy"], results["steady"]
    assert f[0] == s[0]
    assert [o[2:] for o in f[0]] == [(1, 0), (3, 0), (0, 1), (0, 3), (1, 0), (3, 0), (1, 0), (3, 0), (1, 0), (3, 0)]
    assert f[1] == s[1] and len(f[1]) == 20
    assert f[2] == s[2]
    assert f[3] == s[3] and len(f[3]) == 20
    assert f[4] == s[4] and len(f[4]) == 4 and all("http status: 401" in x for x in f[4])
    assert s[5] is None
    if engine == "native":
        carried, event_loop, _ = f[5]
        # warm HBONE connections (direct and denied) are the workers'; the rest the event loop's
        assert (carried, event_loop) == (6, 14), f[5]
    else:
        assert f[5] is None


def _publish(lab) -> None:
    """Write the config atomically (the watcher never reads half a file)."""
    import os

    import yaml

    tmp = lab.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(lab.config(), sort_keys=False))
    os.replace(tmp, lab.config_path)


@pytest.mark.parametrize("change", ["leaves-mesh", "removed"])
def test_a_state_change_racing_new_connections_invalidates_the_cache(lab, engine, change):
    """Connections stream in (4 at a time) while the destination leaves the mesh (plain TCP from
    now on) or leaves the config (passthrough).  The cached HBONE decision is flushed before the
    change applies: after the reload line only the connections already accepted (at most the
    client's 4 in flight) may still be HBONE, every later one takes the new route, and every
    payload is intact."""
    import json

    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a, **FAST)
    # the destination's ztunnel keeps the first config: only the client's decisions change
    frozen = lab.workdir / "server-config.yaml"
    frozen.write_text(lab.config_path.read_text())
    zb = lab.start_ztunnel(b, redirect=False, LOCAL_XDS_PATH=str(frozen))
    warm = lab.client(a, "echo", b.ip, "80", "--size", "100", "--count", "3")
    assert warm["ok"] == 3, warm
    total = 400
    proc, out_path = lab.client_background(a, "echo", b.ip, "80", "--size", "500", "--count", str(total),
                                           "--concurrency", "4")
    deadline = time.monotonic() + 60
    while len(za.lines("complete dur=")) < 3 + 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    if change == "leaves-mesh":
        b.mesh = False
    else:
        del lab.pods[b.name]
    _publish(lab)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = json.loads(out_path.read_text().strip().splitlines()[-1])
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
    stats = fast_stats(lab, za)
    if engine == "native":
        carried, event_loop, flushes = stats
        assert flushes >= 1 and carried >= 50 and carried + event_loop == total + 3, stats
    else:
        assert stats is None


def test_10000_short_connections_hash_checked(lab, engine):
    a, b, za, zb = two_pods(lab, FAST)
    n = 10_000
    out = lab.client(a, "echo", b.ip, "80", "--size", "1024", "--count", str(n), "--concurrency", "50", timeout=600)
    assert out["ok"] == n and out["failed"] == 0 and out["mismatched"] == 0, out
    deadline = time.monotonic() + 30
    while len(za.lines("complete dur=")) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(za.lines("complete dur=")) == n
    assert len(zb.lines("got CONNECT request to")) == n
    m = metrics(lab, a)
    assert [v for (name, _), v in m.items() if name == "istio_tcp_connections_closed_total"] == [n]
    assert sum(v for (name, _), v in m.items() if name == "istio_tcp_sent_bytes_total") == n * 1024
    stats = fast_stats(lab, za)
    if engine == "native":
        carried, event_loop, _ = stats
        assert carried + event_loop == n and carried >= n * 9 // 10, stats
    else:
        assert stats is None


def test_a_lost_fast_path_connection_hands_over_and_is_replaced(lab, engine):
    """The destination's ztunnel restarts: the fast path's HBONE connection dies under it; later
    connections miss, take the event loop's path (which dials anew and installs the class on a new
    connection), then ride the fast path again.  Every one after the restart is intact."""
    a, b, za, zb = two_pods(lab, FAST)
    assert lab.client(a, "echo", b.ip, "80", "--size", "100", "--count", "5")["ok"] == 5
    lab.stop_ztunnel(zb)  # drains: GOAWAY on its HBONE connections, then closes them
    zb2 = lab.start_ztunnel(b, redirect=False, wait=False)
    netns.wait_listening(b.pod, 15008)  # its log (appended to) already holds the first one's ready line
    out = lab.client(a, "echo", b.ip, "80", "--size", "2000", "--count", "30")
    assert out["ok"] == 30 and out["mismatched"] == 0, out
    assert len(zb2.lines("got CONNECT request to")) == 5 + 30  # the log holds both instances' lines
    stats = fast_stats(lab, za)
    if engine == "native":
        carried, event_loop, _ = stats
        assert carried + event_loop == 35 and carried >= 25, stats  # warm before and after the restart
    else:
        assert stats is None


DENY_CLIENT = {"name": "deny-sleep", "namespace": "demo", "scope": "Namespace", "action": "Deny",
               "rules": [[[{"principals": [{"Exact": "cluster.local/ns/demo/sa/sleep"}]}]]]}


def test_a_policy_change_racing_new_connections_lets_no_denied_one_through(lab, engine):
    """Connections stream in (4 at a time, through the client's fast path) while a policy that
    denies the client is published.  Each CONNECT is checked against the policy in force when the
    destination's ztunnel took it (its `got CONNECT` line before or after its reload line): every
    one after the reload is refused, none reaches the app; the ones before either completed or
    were closed by the change; every payload that completed is intact."""
    import json
    import os

    import yaml

    a, b, za, zb = two_pods(lab, FAST)
    total = 400
    proc, out_path = lab.client_background(a, "echo", b.ip, "80", "--size", "500", "--count", str(total),
                                           "--concurrency", "4")
    deadline = time.monotonic() + 60
    while len(za.lines("complete dur=")) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    cfg = yaml.safe_load(lab.config_path.read_text())
    cfg["policies"] = [DENY_CLIENT]
    tmp = lab.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, lab.config_path)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = json.loads(out_path.read_text().strip().splitlines()[-1])
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
    # a tunnel the change closed may have echoed everything already (at most the 4 in flight)
    assert len(ended_ok) <= out["ok"] <= len(ended_ok) + 4 and len(ended_ok) >= 50, (out, len(ended_ok))
    stats = fast_stats(lab, za)
    if engine == "native":
        assert stats[0] >= 50, stats
    else:
        assert stats is None


def test_shared_mode_keeps_each_source_workload_on_its_own_identity(lab, engine):
    """Node mode: two workloads of the node connect to the same destination; the flow class holds
    the source IP, so each one's connections ride an HBONE connection of its own identity, cold
    and warm, and the destination sees who really connected."""
    from .test_shared_mode import node_mesh

    node, w1, w2, sleep, zs, zn = node_mesh(lab, **FAST)
    for round_ in range(3):
        for w in (w1, w2):
            out = lab.client(node, "echo", sleep.ip, "80", "--size", "4096", "--count", "4", "--source", w.ip)
            assert out["ok"] == 4 and out["mismatched"] == 0, out
    got = zs.lines("got CONNECT request")
    assert len(got) == 24
    ids = {sa: sum(f"peer_id=spiffe://cluster.local/ns/demo/sa/{sa}}}" in line for line in got) for sa in ("s1", "s2")}
    assert ids == {"s1": 12, "s2": 12}
    # and in the order they connected: the source of every tunnel is the workload that opened it
    access = access_lines(zn)
    assert [a["src.workload"] for a in access] == (["w1"] * 4 + ["w2"] * 4) * 3
    stats = fast_stats(lab, zn)
    if engine == "native":
        assert stats[0] >= 20 and stats[0] + stats[1] == 24, stats
    else:
        assert stats is None


@pytest.mark.parametrize("side", ["client", "server"])
def test_drain_waits_for_fast_path_tunnels_then_resets_them(lab, engine, side):
    """A tunnel still moving bytes at the drain deadline (carried by the workers once its class is
    warm) is waited for, then closed: the access log says so as the event loop's path does."""
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    deadline_env = {"CONNECTION_TERMINATION_DEADLINE": "1s"}
    za = lab.start_ztunnel(a, **FAST, **(deadline_env if side == "client" else {}))
    zb = lab.start_ztunnel(b, redirect=False, **FAST, **(deadline_env if side == "server" else {}))
    assert lab.client(a, "echo", b.ip, "80", "--size", "100", "--count", "3")["ok"] == 3  # warm
    proc, _ = lab.client_background(a, "echo", b.ip, "80", "--size", str(400 * 1000 * 1000),
                                    "--chunk-delay", "0.004")
    try:
        wait_deadline = time.monotonic() + 20
        while len(zb.lines("got CONNECT request to")) < 4 and time.monotonic() < wait_deadline:
            time.sleep(0.05)
        assert len(zb.lines("got CONNECT request to")) == 4
        time.sleep(0.3)
        zt = za if side == "client" else zb
        zt.proc.send_signal(signal.SIGTERM)
        assert zt.proc.wait(timeout=30) == 0
        assert zt.lines("drain deadline reached: closing ")
        direction = "outbound" if side == "client" else "inbound"
        access = access_lines(zt, direction)
        assert len(access) == 4, access
        assert [x.get("error") for x in access] == [None] * 3 + ['"connection closed due to drain"'], access
        if engine == "native":  # the drained tunnel rode the fast path
            said = "connections carried by the workers" if side == "client" else "CONNECTs answered by the workers"
            stats = [int(line.split(" " + said)[0].rsplit(" ", 1)[1]) for line in zt.lines(said)]
            assert stats and stats[-1] >= 1, stats  # cold: the first of a class takes the event loop's path
    finally:
        proc.kill()
        proc.wait(timeout=10)
