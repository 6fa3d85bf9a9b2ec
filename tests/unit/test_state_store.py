"""StateStore: typed upserts/removals from several sources, one snapshot per change set."""

from __future__ import annotations

from ipaddress import ip_address

from ztunnel_fast.state.policy import Action, Authorization, Scope
from ztunnel_fast.state.service import NetworkAddress, Service
from ztunnel_fast.state.store import LOCAL_SOURCE, XDS_SOURCE, ProxyState, Removal, StateStore
from ztunnel_fast.state.workload import Workload


def w(uid, ip="10.0.0.1", node="n1", services=None):
    return Workload(uid=uid, name=uid, namespace="ns", workload_ips=(ip_address(ip),) if ip else (), node=node,
                    services=services or {})


def svc(host, vip="10.96.0.1"):
    return Service(name=host, namespace="ns", hostname=host, vips=(NetworkAddress("", ip_address(vip)),), ports={80: 0})


def pol(name):
    return Authorization(name=name, namespace="ns", scope=Scope.NAMESPACE, action=Action.DENY)


def test_each_change_set_gives_a_new_snapshot_and_old_ones_stay_unchanged():
    store = StateStore()
    empty = store.state
    s1 = store.apply(XDS_SOURCE, [w("a"), svc("h"), pol("p")])
    assert store.state is s1 and s1 is not empty
    assert empty.workloads() == () and empty.workload_by_ip("10.0.0.1") is None
    assert s1.workload_by_uid("a").uid == "a" and s1.service_by_key("ns/h") and s1.policies()[0].key == "ns/p"
    s2 = store.apply(XDS_SOURCE, removals=[Removal("address", "a"), Removal("policy", "ns/p")])
    assert s2.workload_by_ip("10.0.0.1") is None and s2.policies() == ()
    assert s2.service_by_vip("10.96.0.1").key == "ns/h"
    assert s1.workload_by_ip("10.0.0.1").uid == "a"  # the old snapshot is untouched


def test_address_removal_covers_workloads_and_services():
    store = StateStore()
    store.apply(XDS_SOURCE, [w("a"), svc("h")])
    state = store.apply(XDS_SOURCE, removals=[Removal("address", "ns/h")])
    assert state.service_by_key("ns/h") is None and state.service_by_vip("10.96.0.1") is None
    assert state.workload_by_uid("a") is not None


def test_upsert_replaces_and_reindexes():
    store = StateStore()
    store.apply(XDS_SOURCE, [w("a", "10.0.0.1", node="n1", services={"ns/h": {}}), svc("h")])
    state = store.apply(XDS_SOURCE, [w("a", "10.0.0.2", node="n2")])
    assert state.workload_by_ip("10.0.0.1") is None
    assert state.workload_by_ip("10.0.0.2").uid == "a"
    assert state.workloads_on_node("n1") == () and [x.uid for x in state.workloads_on_node("n2")] == ["a"]
    assert state.endpoints(state.service_by_key("ns/h")) == ()
    assert len(state.workloads()) == 1


def test_endpoints_follow_upserts_and_removals():
    store = StateStore()
    store.apply(XDS_SOURCE, [svc("h"), w("a", "10.0.0.1", services={"ns/h": {80: 8080}}),
                             w("b", "10.0.0.2", services={"ns/h": {}})])
    state = store.apply(XDS_SOURCE, removals=[Removal("address", "a")])
    assert [e.workload.uid for e in state.endpoints(state.service_by_key("ns/h"))] == ["b"]


def test_ip_reuse_last_writer_wins_and_a_late_removal_does_not_drop_the_new_owner():
    store = StateStore()
    store.apply(XDS_SOURCE, [w("old", "10.0.0.9")])
    state = store.apply(XDS_SOURCE, [w("new", "10.0.0.9")])
    assert state.workload_by_ip("10.0.0.9").uid == "new"
    state = store.apply(XDS_SOURCE, removals=[Removal("address", "old")])
    assert state.workload_by_ip("10.0.0.9").uid == "new"
    assert state.workload_by_uid("old") is None


def test_removals_apply_before_upserts_in_one_change_set():
    store = StateStore()
    store.apply(XDS_SOURCE, [w("old", "10.0.0.9")])
    state = store.apply(XDS_SOURCE, [w("new", "10.0.0.9")], [Removal("address", "old")])
    assert state.workload_by_ip("10.0.0.9").uid == "new"


def test_sources_do_not_erase_each_other():
    store = StateStore()
    store.replace(LOCAL_SOURCE, [w("l1", "10.0.0.1"), w("l2", "10.0.0.2")], [], [pol("lp")])
    store.apply(XDS_SOURCE, [w("x1", "10.0.0.3")])
    state = store.apply(XDS_SOURCE, removals=[Removal("address", "l1"), Removal("policy", "ns/lp")])
    assert state.workload_by_uid("l1") is not None and len(state.policies()) == 1  # not xDS's to remove
    state = store.replace(LOCAL_SOURCE, [w("l2", "10.0.0.2")], [], [])
    assert sorted(x.uid for x in state.workloads()) == ["l2", "x1"]
    assert state.policies() == ()
    assert store.owned(LOCAL_SOURCE) == {"workload": {"l2"}, "service": set(), "policy": set()}
    assert store.owned(XDS_SOURCE)["workload"] == {"x1"}


def test_replace_matches_the_strict_constructor():
    objs = ([w("a", "10.0.0.1", services={"ns/h": {}}), w("b", "10.0.0.2", node="n2")], [svc("h")], [pol("p")])
    built = ProxyState(*objs)
    stored = StateStore().replace(LOCAL_SOURCE, *objs)
    for s in (built, stored):
        assert [x.uid for x in s.workloads()] == ["a", "b"]
        assert s.workload_by_ip("10.0.0.2").uid == "b"
        assert [x.uid for x in s.workloads_on_node("n1")] == ["a"]
        assert [e.workload.uid for e in s.endpoints(s.service_by_key("ns/h"))] == ["a"]
        assert s.service_by_vip("10.96.0.1").key == "ns/h" and [p.key for p in s.policies()] == ["ns/p"]


def test_policy_tuple_is_reused_until_a_policy_changes():
    store = StateStore()
    s1 = store.apply(XDS_SOURCE, [pol("p")])
    s2 = store.apply(XDS_SOURCE, [w("a")])
    assert s2.policies() is s1.policies()  # ProxyContext skips recompiling the policy index
    s3 = store.apply(XDS_SOURCE, [pol("q")])
    assert s3.policies() is not s2.policies() and [p.key for p in s3.policies()] == ["ns/p", "ns/q"]
    s4 = store.apply(XDS_SOURCE, removals=[Removal("policy", "ns/missing")])
    assert s4.policies() is s3.policies()
