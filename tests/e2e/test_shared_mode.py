"""Shared (node) mode: one ztunnel-fast serves several workloads of its node.

The source workload is found by the connection's source IP, the inbound certificate is chosen by
the destination IP, unknown sources are refused, and the node-local fast path (an option) carries
same-node traffic without TLS.  Node "node1" is one network namespace holding the IPs of two
workloads (w1, w2) and a shared ztunnel-fast; "sleep" is a mesh pod on node2 with its own
dedicated ztunnel-fast.
"""

from __future__ import annotations

import pytest

from ztunnel_fast import netns

pytestmark = pytest.mark.e2e

W1, W2 = "198.18.0.11", "198.18.0.12"


def node_mesh(lab, **shared_env):
    node = lab.pod("node1", node="node1", ip="198.18.0.10", workload=False)
    w1 = lab.node_workload(node, "w1", W1, namespace="demo", service_account="s1")
    w2 = lab.node_workload(node, "w2", W2, namespace="demo", service_account="s2")
    sleep = lab.pod("sleep", namespace="demo", node="node2", ip="198.18.0.20")
    lab.write_config()
    lab.app(node, "serve", "80", "echo", port=80)  # listens on every address of node1
    lab.app(sleep, "serve", "80", "echo", port=80)
    zs = lab.start_ztunnel(sleep)
    # no node redirection rules here (the workloads' IPs are local to node1's netns), so no
    # source spoofing: test_redirect.py covers shared mode with the real rules
    zn = lab.start_ztunnel(node, shared=True, ENABLE_ORIG_SRC="false", **shared_env)
    return node, w1, w2, sleep, zs, zn


def test_inbound_certificate_chosen_by_destination_ip(lab):
    node, w1, w2, sleep, zs, zn = node_mesh(lab)
    for w in (w1, w2):
        out = lab.client(sleep, "echo", w.ip, "80", "--size", "65536")
        assert out["ok"], out
        # the sleep side's ztunnel only accepts the server identity of the workload it dialled
        assert zs.lines(f"proxy to {w.ip}:80 using HBONE via {w.ip}:15008")
        assert zn.lines(f"got CONNECT request to {w.ip}:80")
    assert not zs.lines("failed dur=")


def test_outbound_source_workload_found_by_source_ip(lab):
    node, w1, w2, sleep, zs, zn = node_mesh(lab)
    for w, sa in ((w1, "s1"), (w2, "s2")):
        out = lab.client(node, "echo", sleep.ip, "80", "--size", "4096", "--source", w.ip)
        assert out["ok"], out
        assert any(f"peer_ip=198.18.0.10 peer_id=spiffe://cluster.local/ns/demo/sa/{sa}}}" in line
                   for line in zs.lines("got CONNECT request")), zs.log()


def test_unknown_source_is_refused(lab):
    node, w1, w2, sleep, zs, zn = node_mesh(lab)
    # the node's own address is no workload of this node
    out = lab.client(node, "echo", sleep.ip, "80", "--size", "4096", "--source", node.ip)
    assert not out["ok"] and out.get("received", 0) == 0
    assert any("unknown source workload 198.18.0.10" in line for line in zn.lines("failed dur="))
    assert not zs.lines("got CONNECT request")


def test_node_local_fast_path(lab):
    node, w1, w2, sleep, zs, zn = node_mesh(lab, NODE_LOCAL_FAST_PATH="true")
    # same-netns traffic leaves through lo, which the generic rule skips: capture w2 explicitly
    netns.iptables(node.pod, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", W2, "-m", "mark", "!", "--mark",
                   "0x539/0xfff", "-j", "REDIRECT", "--to-ports", "15001")
    out = lab.client(node, "echo", W2, "80", "--size", str(1 << 20), "--source", W1)
    assert out["ok"], out
    assert zn.lines(f"proxying to {W2}:80 using node local fast path")
    assert not zn.lines("got CONNECT request")  # no HBONE, no TLS
    # a workload on another node still goes over HBONE
    assert lab.client(node, "echo", sleep.ip, "80", "--size", "1024", "--source", W1)["ok"]
    assert zn.lines(f"proxy to {sleep.ip}:80 using HBONE")
