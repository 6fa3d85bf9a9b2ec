"""The inbound fast path (ZTUNNEL_FAST_PATH) in in-pod mode: a pod's 15008 lives in the pod's
network namespace and its upstream dial to the app must leave from there; the native workers
create that socket inside the pod's namespace (the fd istio-cni handed over) and answer the warm
CONNECTs themselves.  The pure twin ignores the switch and keeps the reference path: the same
answers, lines and payloads (checked by sha256) on both engines.  A pod's removal takes its
verdicts (and every use of its namespace fd) away before its ack; a policy change still
invalidates them.  Fixtures: tests/e2e/test_inpod.py's mesh (node1: sleep, web, spare; node2:
echo); node1's ztunnel-fast has the switch on, echo's CONNECTs arrive there.
"""

from __future__ import annotations

import json
import os

import pytest

from ztunnel_fast.fakes.cni import install_inpod_rules

from . import fastpath_support as fp
from .test_inpod import listening, mesh, start_both, uid  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

DENY_ECHO = {"name": "deny-echo", "namespace": "demo", "scope": "Namespace", "action": "Deny",
             "rules": [[[{"principals": [{"Exact": "cluster.local/ns/demo/sa/echo"}]}]]]}


@pytest.mark.parametrize("fast", [False, True], ids=["fast-off", "fast-on"])
def test_a_pods_inbound_connects_agree_with_the_switch_on_and_off(lab, mesh, engine, fast):
    """Sequential connections from echo (node2) to web (node1): hash-checked, one line, access log
    line and metric per connection whichever path carries them; the app sees the peer's address
    (ORIG_SRC, spoofed from inside the pod), as the reference path gives it."""
    m = mesh
    start_both(m, **(fp.FAST if fast else fp.SLOW))
    z1 = m.zt["node1"]
    lab.app(m.web, "serve", "81", "whoami", "--name", "web", port=81)
    n = 30
    out = lab.client(m.echo, "echo", m.web.ip, "80", "--size", "3000", "--count", str(n), "--concurrency", "1")
    assert out["ok"] == n and out["failed"] == 0 and out["mismatched"] == 0, out
    names = lab.client(m.echo, "whoami", m.web.ip, "81", "--count", "8")["names"]
    assert [x.split() for x in names] == [["web", m.echo.ip]] * 8
    got = z1.lines(f"got CONNECT request to {m.web.ip}:80")
    proxied = m.zt["node2"].lines(f"proxy to {m.web.ip}:80 using HBONE")
    assert len(got) == n and {fp.trace_id(x) for x in got} == {fp.trace_id(x, "outbound") for x in proxied}
    assert all(f"peer_ip={m.echo.ip} " in x and "peer_id=spiffe://cluster.local/ns/demo/sa/echo" in x for x in got)
    assert len(fp.wait_lines(z1, "complete dur=", n + 8, timeout=30)) == n + 8
    access = [a for a in fp.access_lines(z1, "inbound") if a["dst.addr"] == f"{m.web.ip}:80"]
    assert len(access) == n and all(a == access[0] for a in access), access[:2]
    assert access[0]["bytes_sent"] == "3000" and access[0]["bytes_recv"] == "3000", access[0]
    assert "ns/demo/sa/echo" in access[0].get("src.identity", ""), access[0]
    opened = {labels: v for (name, labels), v in fp.metrics(lab, m.nodes["node1"]).items()
              if name == "istio_tcp_connections_opened_total" and ("reporter", "destination") in labels}
    assert sorted(opened.values()) == [n + 8], opened
    assert not z1.lines("tunnel of unknown flow")
    stats = fp.expect_counters(fp.inbound_stats(lab, z1), engine, fast)
    if stats is not None:
        answered, handed, _ = stats
        # cold: the first CONNECT of each class (web:80 and web:81 on node2's HBONE connection)
        assert handed == 0 and n + 8 - 2 <= answered <= n + 8 - 2 + 2, stats
        assert fp.inbound_netns_errors(lab, z1) == 0


def test_many_short_connects_into_a_pod_hash_checked(lab, mesh, engine):
    m = mesh
    start_both(m, **fp.FAST)
    z1 = m.zt["node1"]
    n = 2000
    fp.many_short_hash_checked(lab, m.echo, m.web.ip, n, concurrency=30, done_on=z1, got_on=z1,
                               pod=m.nodes["node1"], timeout=600)
    stats = fp.expect_counters(fp.inbound_stats(lab, z1), engine)
    if stats is not None:
        answered, handed, _ = stats
        assert answered >= n * 9 // 10 and handed == 0, stats
        assert fp.inbound_netns_errors(lab, z1) == 0


def test_a_pod_removed_while_connects_race(lab, mesh, engine):
    """echo opens short connections to spare, 4 at a time, while istio-cni deletes spare: every
    connection either completes hash-checked or fails; no worker uses spare's namespace fd once
    it may be closed (no namespace error, no tunnel of a forgotten verdict), and once spare has
    stopped ztunnel-fast holds no descriptor of spare's namespace and no more descriptors than
    before spare came; web keeps its fast path."""
    m = mesh
    start_both(m, **fp.FAST)
    z1 = m.zt["node1"]
    warm = lab.client(m.echo, "echo", m.web.ip, "80", "--size", "1024", "--count", "5", "--concurrency", "1")
    assert warm["ok"] == 5, warm
    before = fp.fds(z1.proc)
    path = f"/run/netns/{m.spare.pod.netns}"
    spare_ns = {path, f"net:[{os.stat(path).st_ino}]"}  # how a descriptor of spare's namespace reads

    def of_spare(fds: list[str]) -> list[str]:
        return [x for x in fds if x in spare_ns]

    assert not of_spare(before)
    assert m.add(m.spare) == ""
    assert len(of_spare(fp.fds(z1.proc))) == 1  # the pod's handle, while it is served
    pre = lab.client(m.echo, "echo", m.spare.ip, "80", "--size", "1024", "--count", "20", "--concurrency", "1")
    assert pre["ok"] == 20 and pre["mismatched"] == 0, pre
    n = 4000
    racing, racing_out = lab.client_background(m.echo, "echo", m.spare.ip, "80", "--size", "1024", "--count",
                                               str(n), "--concurrency", "4")
    try:
        m.wait(lambda: len(z1.lines(f"got CONNECT request to {m.spare.ip}:80")) >= 20 + 200,
               "the racing connections to flow")
        assert m.cni["node1"].delete(uid(m.spare)) == ""
        assert not listening(lab, m.spare, 15008)
        # as istio-cni does when a pod leaves the mesh: without its rules, echo's ztunnel is refused
        # at once (with them, its SYNs to the gone listener would wait out the connect timeout)
        install_inpod_rules(m.spare.pod.netns, uninstall=True)
        assert racing.wait(300) == 0
    finally:
        if racing.poll() is None:
            racing.kill()
            racing.wait(10)
    result = json.loads(racing_out.read_text().splitlines()[-1])
    assert result["ok"] + result["failed"] == n and result["mismatched"] == 0, result
    assert 200 <= result["ok"] < n, result  # the delete landed mid-race
    m.wait(lambda: z1.lines(f"pod demo/spare (uid {uid(m.spare)}) proxy stopped"), "spare's stop")
    # its namespace handle is closed and nothing of it is left behind (its sockets and connections
    # end with it; the bound: ztunnel-fast's own descriptors come and go, never more than before)
    def spare_gone() -> bool:
        now = fp.fds(z1.proc)
        return not of_spare(now) and len(now) <= len(before)

    m.wait(spare_gone, "spare's descriptors to go")
    assert not z1.lines("tunnel of unknown flow") and not z1.lines("Bad file descriptor")
    after = lab.client(m.echo, "echo", m.spare.ip, "80", "--size", "1024", "--count", "5", "--concurrency", "1")
    assert after["ok"] == 0 and after["failed"] == 5, after
    # web still rides the workers
    again = lab.client(m.echo, "echo", m.web.ip, "80", "--size", "2048", "--count", "20")
    assert again["ok"] == 20 and again["mismatched"] == 0, again
    stats = fp.expect_counters(fp.inbound_stats(lab, z1), engine)
    if stats is not None:
        answered, _, flushes = stats
        assert answered >= 20 + result["ok"] // 2 and flushes >= 1, (stats, result)
        assert fp.inbound_netns_errors(lab, z1) == 0


def test_a_policy_change_racing_connects_into_a_pod_lets_no_denied_one_through(lab, mesh, engine):
    """Connections stream from echo into web (4 at a time) while a policy denying echo is
    published: every CONNECT node1 took after its reload is refused and none reaches the app (no
    stale verdict of the pod's is used), those before completed or were closed by the change."""
    m = mesh
    start_both(m, **fp.FAST)
    z1 = m.zt["node1"]
    total = 1000
    out = fp.race(lab, m.echo, m.web.ip, z1, lambda: fp.publish(lab, [DENY_ECHO]), total=total)
    fp.assert_no_connect_after_deny(z1, out, total)
    stats = fp.expect_counters(fp.inbound_stats(lab, z1), engine)
    if stats is not None:
        assert stats[0] >= 50 and stats[2] >= 1, stats
        assert fp.inbound_netns_errors(lab, z1) == 0
