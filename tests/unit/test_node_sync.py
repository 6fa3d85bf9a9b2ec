"""Node redirection from the state: which IPs the node's ipset must hold (pure), the coalescing
of state changes, and the one state hook every source goes through (ProxyContext.replace_state)."""

from __future__ import annotations

import asyncio
from ipaddress import ip_address

from ztunnel_fast.redirect import node_sync
from ztunnel_fast.redirect.node_sync import NodeRedirection, node_member_ips, skipped_ipv6
from ztunnel_fast.state.store import ProxyState
from ztunnel_fast.state.workload import TunnelProtocol, Workload


def wl(name: str, node: str, *ips: str, hbone: bool = True) -> Workload:
    return Workload(uid=f"Kubernetes//Pod/demo/{name}", name=name, namespace="demo",
                    workload_ips=tuple(ip_address(i) for i in ips), node=node,
                    protocol=TunnelProtocol.HBONE if hbone else TunnelProtocol.TCP)


STATE = ProxyState([
    wl("a", "node-a", "10.1.0.2"),
    wl("b", "node-a", "10.1.0.3", "fd00::3"),             # dual stack: the IPv4 address only
    wl("legacy", "node-a", "10.1.0.4", hbone=False),       # not in the mesh
    wl("remote", "node-b", "10.2.0.2"),                    # another node's pod
    wl("nowhere", "", "10.9.0.9"),                         # no node (e.g. a VM entry)
])


def test_members_are_the_hbone_ipv4_addresses_on_the_node():
    assert node_member_ips(STATE, "node-a") == {"10.1.0.2", "10.1.0.3"}
    assert node_member_ips(STATE, "node-b") == {"10.2.0.2"}
    assert node_member_ips(STATE, "node-c") == frozenset()
    assert node_member_ips(ProxyState(), "node-a") == frozenset()


def test_ipv6_addresses_are_reported_not_added():
    assert skipped_ipv6(STATE, "node-a") == ["fd00::3"]
    assert skipped_ipv6(STATE, "node-b") == []


def test_a_workload_leaving_the_mesh_leaves_the_set():
    after = ProxyState([wl("a", "node-a", "10.1.0.2", hbone=False), wl("b", "node-a", "10.1.0.3")])
    assert node_member_ips(after, "node-a") == {"10.1.0.3"}


def test_updates_are_coalesced_to_the_newest_state(monkeypatch):
    applied: list[frozenset[str]] = []

    def fake_apply(name, desired):
        applied.append(frozenset(desired))
        return sorted(desired), []

    async def scenario():
        monkeypatch.setattr(node_sync, "_apply_members", fake_apply)
        nr = NodeRedirection("node-a")
        monkeypatch.setattr(nr, "_install_if_missing", lambda: None)
        await nr.start(ProxyState([wl("a", "node-a", "10.1.0.2")]))
        # Three changes before the follower runs: only the last one is applied.
        nr.update(ProxyState([wl("x", "node-a", "10.1.0.7")]))
        nr.update(ProxyState([wl("y", "node-a", "10.1.0.8")]))
        nr.update(ProxyState([wl("z", "node-a", "10.1.0.9")]))
        for _ in range(100):  # bounded: the follower needs a few loop turns and one thread hop
            if nr.syncs == 2:
                break
            await asyncio.sleep(0.01)
        nr.close()
        return nr.syncs

    assert asyncio.run(scenario()) == 2
    assert applied == [{"10.1.0.2"}, {"10.1.0.9"}]


def test_a_failed_sync_is_logged_and_the_next_change_retries(monkeypatch, caplog):
    calls = []

    def flaky_apply(name, desired):
        calls.append(set(desired))
        if len(calls) == 1:
            raise node_sync.ipset.IpsetError("ipset add: kernel says no")
        return sorted(desired), []

    async def scenario():
        monkeypatch.setattr(node_sync, "_apply_members", flaky_apply)
        nr = NodeRedirection("node-a")
        monkeypatch.setattr(nr, "_install_if_missing", lambda: None)
        await nr.start(STATE)  # fails, does not raise
        nr.update(STATE)
        for _ in range(100):
            if nr.syncs == 1:
                break
            await asyncio.sleep(0.01)
        nr.close()
        return nr.syncs

    assert asyncio.run(scenario()) == 1
    assert len(calls) == 2
    assert "not updated, keeping its members: ipset add: kernel says no" in caplog.text


def test_replace_state_notifies_listeners_after_the_swap():
    from ztunnel_fast.config import Config
    from ztunnel_fast.proxy.context import ProxyContext

    seen = []
    ctx = ProxyContext(config=Config(), state=ProxyState(), certs=None, engine=None, h2=None)
    ctx.state_listeners.append(lambda s: seen.append((s, ctx.state is s)))
    ctx.replace_state(STATE)
    assert seen == [(STATE, True)]
