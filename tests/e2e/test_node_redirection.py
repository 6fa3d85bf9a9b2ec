"""ZTUNNEL_REDIRECTION=node end to end: a shared ztunnel-fast in a node's network namespace
installs the node rules and keeps the ipset ztunnel-pods-ips equal to the HBONE workloads of its
node, following every change of its config source (here the local config file; xDS feeds the
same state hook).  The node is a namespace of this test: the host's ipsets and rules are never
touched, and everything goes away with the namespace."""

from __future__ import annotations

import time

import pytest
import yaml

from ztunnel_fast.redirect import ipset, rules

pytestmark = pytest.mark.e2e

SET = "ztunnel-pods-ips"
WAIT_S = 15.0  # bound for "until the file watcher (1 s poll) and the sync applied it"


def workload(name: str, ip: str, node: str = "node1", protocol: str = "HBONE") -> dict:
    return {"uid": f"Kubernetes//Pod/demo/{name}", "name": name, "namespace": "demo", "serviceAccount": name,
            "workloadIps": [ip], "protocol": protocol, "node": node}


def write(lab, *workloads: dict) -> None:
    lab.config_path.write_text(yaml.safe_dump({"workloads": list(workloads)}, sort_keys=False))


def wait_members(node, expected: set[str]) -> set[str]:
    deadline = time.monotonic() + WAIT_S
    current = None
    while time.monotonic() < deadline:
        current = ipset.members(SET, netns=node.pod.netns)
        if current == expected:
            return current
        time.sleep(0.1)
    return current


def wait_line(zt, needle: str) -> list[str]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and not zt.lines(needle):
        time.sleep(0.1)
    return zt.lines(needle)


def test_ipset_follows_the_state(lab, topology):
    node = lab.pod("node1", node="node1", ip="198.18.0.10", workload=False)
    write(lab,
          workload("w1", "10.1.0.2"),
          workload("w2", "10.1.0.3", protocol="TCP"),       # not in the mesh
          workload("far", "10.2.0.2", node="node2"))        # another node's pod
    zt = lab.start_ztunnel(node, shared=True, redirect=False, ZTUNNEL_REDIRECTION="node")

    # The rules were absent: installed at start, with the set.
    saved = topology.run(node.pod, ["iptables-legacy-save", "-t", "mangle"]).stdout
    for chain in (rules.NODE_PREROUTING, rules.NODE_INPUT, rules.NODE_OUTPUT):
        assert f":{chain} " in saved, saved
    assert f"--match-set {SET}" in saved
    assert wait_members(node, {"10.1.0.2"}) == {"10.1.0.2"}, zt.log()

    # w2 joins the mesh, w1 goes away, a new HBONE pod arrives: the set follows.
    write(lab, workload("w2", "10.1.0.3"), workload("w4", "10.1.0.5"), workload("far", "10.2.0.2", node="node2"))
    assert wait_members(node, {"10.1.0.3", "10.1.0.5"}) == {"10.1.0.3", "10.1.0.5"}, zt.log()
    assert wait_line(zt, "node redirection: ipset ztunnel-pods-ips now has 2 members"), zt.log()

    # An invalid file is refused whole: the members stay.
    lab.config_path.write_text("workloads: [{name: broken}]\n")
    assert wait_line(zt, "local config change ignored"), zt.log()
    assert ipset.members(SET, netns=node.pod.netns) == {"10.1.0.3", "10.1.0.5"}

    # Restart with a changed file: the rules are found in place and the set is synced at start.
    assert lab.stop_ztunnel(zt) == 0
    zt.log_path.rename(zt.log_path.with_suffix(".first.log"))  # the second run's log starts empty
    write(lab, workload("w4", "10.1.0.5"))
    zt2 = lab.start_ztunnel(node, shared=True, redirect=False, ZTUNNEL_REDIRECTION="node")
    assert ipset.members(SET, netns=node.pod.netns) == {"10.1.0.5"}  # before "proxy ready"
    assert zt2.lines("node redirection: rules and ipset ztunnel-pods-ips already installed")

    # Nothing in the mesh on this node any more: an empty set, not a missing one.
    write(lab)
    assert wait_members(node, set()) == set(), zt2.log()
    assert zt2.proc.poll() is None
