"""The outbound fast path (ZTUNNEL_FAST_PATH) in in-pod mode (inbound: test_fast_path_inbound_inpod.py): every pod istio-cni hands over gets
its own outbound listener served by the native workers (flow classes keyed by the pod's
listener), and a pod's DelWorkload takes its listener away from the workers before the ack.  The
pure twin ignores the switch.  Outcomes, logs, access log, metrics and workloadState must be the
same with the switch on and off, on both engines.  Fixtures: tests/e2e/test_inpod.py's mesh.
"""

from __future__ import annotations

import json

import pytest

from . import fastpath_support as fp
from .test_inpod import listening, mesh, start_both, uid  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e



@pytest.mark.parametrize("fast", [False, True], ids=["fast-off", "fast-on"])
def test_pods_connections_agree_with_the_switch_on_and_off(lab, mesh, engine, fast):
    """Sequential connections from sleep to echo (other node) and to web (same node): the same
    lines, access log, metrics and workloadState whichever path carries them."""
    m = mesh
    start_both(m, **(fp.FAST if fast else fp.SLOW))
    z1, z2 = m.zt["node1"], m.zt["node2"]
    n = 30
    for dst in (m.echo, m.web):
        out = lab.client(m.sleep, "echo", dst.ip, "80", "--size", "3000", "--count", str(n), "--concurrency", "1")
        assert out["ok"] == n and out["failed"] == 0 and out["mismatched"] == 0, out
    proxied = {dst.name: z1.lines(f"proxy to {dst.ip}:80 using HBONE via {dst.ip}:15008 type Direct")
               for dst in (m.echo, m.web)}
    assert [len(v) for v in proxied.values()] == [n, n]
    ids = {fp.trace_id(line, "outbound") for v in proxied.values() for line in v}
    assert len(ids) == 2 * n
    # the destinations saw each connection's trace id
    got = z2.lines(f"got CONNECT request to {m.echo.ip}:80") + z1.lines(f"got CONNECT request to {m.web.ip}:80")
    assert {fp.trace_id(line) for line in got} == ids
    assert all(f"peer_ip={m.sleep.ip} " in line for line in got)
    # sleep's 2n, and web's inbound n (node1 serves both)
    assert len(fp.wait_lines(z1, "complete dur=", 3 * n, timeout=30)) >= 3 * n
    access = [a for a in fp.access_lines(z1) if a["src.addr"] == m.sleep.ip]
    assert len(access) == 2 * n
    for dst in (m.echo, m.web):
        mine = [a for a in access if a["dst.addr"] == f"{dst.ip}:15008"]
        assert len(mine) == n and all(a == mine[0] for a in mine), mine[:2]
        assert mine[0]["bytes_sent"] == "3000" and mine[0]["bytes_recv"] == "3000", mine[0]
        assert "ns/demo/sa/sleep" in mine[0].get("src.identity", ""), mine[0]
    opened = {labels: v for (name, labels), v in fp.metrics(lab, m.nodes["node1"]).items()
              if name == "istio_tcp_connections_opened_total" and ("reporter", "source") in labels}
    assert sorted(opened.values()) == [n, n], opened
    # a held connection of a warm class, as `istioctl ztunnel-config connections` sees it
    held, held_out = lab.client_background(m.sleep, "hold", m.echo.ip, "80", "--seconds", "3")
    m.wait(lambda: '"established"' in held_out.read_text(), "the held connection")
    live = m.workload_state("node1")[uid(m.sleep)]["connections"]["outbound"]
    assert [(c["originalDst"], c["actualDst"], c["protocol"]) for c in live] == [
        (f"{m.echo.ip}:80", f"{m.echo.ip}:15008", "HBONE")]
    assert live[0]["src"].startswith(f"{m.sleep.ip}:")
    assert held.wait(60) == 0
    m.wait(lambda: not m.workload_state("node1")[uid(m.sleep)]["connections"]["outbound"], "the list to empty")
    stats = fp.expect_counters(fp.outbound_stats(lab, z1), engine, fast)
    if stats is not None:
        carried, event_loop, _ = stats
        # cold: the first connections of each class (one HBONE connection dialled per class)
        assert carried + event_loop == 2 * n + 1 and carried >= 2 * n - 8, stats


def test_many_short_connections_hash_checked(lab, mesh, engine):
    m = mesh
    start_both(m, **fp.FAST)
    z1 = m.zt["node1"]
    n = 3000
    fp.many_short_hash_checked(lab, m.sleep, m.echo.ip, n, concurrency=50, done_on=z1, got_on=m.zt["node2"],
                            pod=m.nodes["node1"], timeout=600)
    stats = fp.expect_counters(fp.outbound_stats(lab, z1), engine)
    if stats is not None:
        carried, event_loop, _ = stats
        assert carried + event_loop == n and carried >= n * 9 // 10, stats


def test_a_pod_deleted_while_its_connections_race(lab, mesh, engine):
    """spare opens short connections, 4 at a time, while istio-cni deletes it: every connection
    either completes hash-checked or fails; none is accepted after the DelWorkload's ack (a
    client after it is refused and nothing more is proxied from spare); the other pods keep
    their fast path."""
    m = mesh
    start_both(m, **fp.FAST)
    z1 = m.zt["node1"]
    assert m.add(m.spare) == ""
    warm = lab.client(m.spare, "echo", m.echo.ip, "80", "--size", "1024", "--count", "20", "--concurrency", "1")
    assert warm["ok"] == 20, warm
    n = 4000
    racing, racing_out = lab.client_background(m.spare, "echo", m.echo.ip, "80", "--size", "1024", "--count",
                                               str(n), "--concurrency", "4")
    m.wait(lambda: len(z1.lines(f"proxy to {m.echo.ip}:80")) >= 20 + 200, "the racing connections to flow")
    assert m.cni["node1"].delete(uid(m.spare)) == ""
    # answered: spare's outbound listener is gone now, the workers' copies too (the kernel lists a
    # socket while any descriptor of it is open)
    assert not listening(lab, m.spare, 15001)
    assert racing.wait(300) == 0
    result = json.loads(racing_out.read_text().splitlines()[-1])
    assert result["ok"] + result["failed"] == n and result["mismatched"] == 0, result
    assert 200 <= result["ok"] < n, result  # the delete landed mid-race
    m.wait(lambda: z1.lines(f"pod demo/spare (uid {uid(m.spare)}) proxy stopped"), "spare's stop")
    proxied = len(z1.lines(f"proxy to {m.echo.ip}:80"))
    assert result["ok"] + 20 <= proxied
    m.wait(lambda: len([a for a in fp.access_lines(z1) if a["src.addr"] == m.spare.ip]) == proxied, "the access log")
    # after the ack: refused, and nothing more is proxied from spare
    after = lab.client(m.spare, "echo", m.echo.ip, "80", "--size", "1024", "--count", "20", "--concurrency", "1")
    assert after["ok"] == 0 and after["failed"] == 20, after
    assert len(z1.lines(f"proxy to {m.echo.ip}:80")) == proxied
    assert len([a for a in fp.access_lines(z1) if a["src.addr"] == m.spare.ip]) == proxied
    # the other pods still ride their fast path
    again = lab.client(m.sleep, "echo", m.echo.ip, "80", "--size", "2048", "--count", "20")
    assert again["ok"] == 20 and again["mismatched"] == 0, again
    stats = fp.expect_counters(fp.outbound_stats(lab, z1), engine)
    if stats is not None:
        assert stats[0] >= result["ok"] // 2, (stats, result)


def test_a_pods_upstream_sockets_stay_inside_the_pod_with_the_switch_on(lab, mesh, engine):
    """Warm classes too: without source spoofing a socket's address tells where it was created.
    The outbound fast path's HBONE connections leave from the pod, and a pod's inbound CONNECTs,
    which the workers answer once warm, are dialled from inside the pod (the workers create the
    socket in the pod's namespace), so the app sees the pod's own address every time."""
    m = mesh
    start_both(m, ENABLE_ORIG_SRC="false", **fp.FAST)
    assert m.add(m.spare) == ""
    lab.app(m.spare, "serve", "81", "whoami", "--name", "spare", port=81)
    # inbound to spare, 8 connections of one class: the app always sees spare's own address
    names = lab.client(m.echo, "whoami", m.spare.ip, "81", "--count", "8")["names"]
    assert [n.split() for n in names] == [["spare", m.spare.ip]] * 8
    assert m.nodes["node1"].ip != m.spare.ip
    assert len(m.zt["node1"].lines(f"got CONNECT request to {m.spare.ip}:81")) == 8
    # a dial from outside the pod would have been captured by the pod's own 15006 (in-pod rules)
    assert not m.zt["node1"].lines(f"proxying plaintext to {m.spare.ip}:81")
    # outbound from sleep, warm: every CONNECT reaches echo's ztunnel from sleep's address
    out = lab.client(m.sleep, "echo", m.echo.ip, "80", "--size", "1024", "--count", "20")
    assert out["ok"] == 20 and out["mismatched"] == 0, out
    got = m.zt["node2"].lines(f"got CONNECT request to {m.echo.ip}:80")
    assert len(got) == 20 and all(f"peer_ip={m.sleep.ip} " in line for line in got)
    stats = fp.expect_counters(fp.outbound_stats(lab, m.zt["node1"]), engine)
    if stats is not None:
        carried, event_loop, _ = stats
        assert carried + event_loop == 20 and carried >= 15, stats
    inbound = fp.expect_counters(fp.inbound_stats(lab, m.zt["node1"]), engine)
    if inbound is not None:  # the 7 warm CONNECTs to spare by the workers, none handed back
        assert inbound[:2] == (7, 0), inbound
