"""ProxyState lookups, target_port rules and round robin, built from local config text."""

from __future__ import annotations

import textwrap
from ipaddress import ip_address

import pytest

from ztunnel_fast.state.service import NetworkAddress, Service
from ztunnel_fast.state.store import Endpoint, ProxyState, RoundRobin, canonical_ip, target_port
from ztunnel_fast.state.workload import Workload, WorkloadStatus
from ztunnel_fast.xds.local import parse_local_config

CONFIG = textwrap.dedent("""\
    workloads:
    - uid: w1
      name: echo-1
      namespace: default
      node: node-a
      workloadIps: ["10.0.0.1", "fd00::1"]
      services: {default/echo: {80: 8080}}
    - uid: w2
      name: echo-2
      namespace: default
      node: node-b
      workloadIps: ["10.0.0.2"]
      services: {default/echo: {}}
    - uid: w3
      name: echo-3
      namespace: default
      node: node-a
      network: remote
      workloadIps: ["10.0.0.1"]
      services: {default/echo: {}}
    - uid: w4
      name: nowhere
      namespace: default
      node: node-a
      services: {default/echo: {}}
    services:
    - name: echo
      namespace: default
      hostname: echo
      vips: ["10.96.0.1", "remote/10.96.0.1", "fd00:96::1"]
      ports: {80: 8000, 81: 0}
    - name: lonely
      namespace: default
      hostname: lonely
      vips: ["10.96.0.2"]
      ports: {80: 80}
    policies:
    - {name: p, namespace: default, scope: Namespace, action: Deny}
""")


@pytest.fixture
def state() -> ProxyState:
    return ProxyState.from_local(parse_local_config(CONFIG, "test"))


@pytest.mark.parametrize("ip,network,uid", [
    ("10.0.0.1", "", "w1"),
    (ip_address("10.0.0.1"), "", "w1"),
    ("::ffff:10.0.0.1", "", "w1"),
    (ip_address("::ffff:10.0.0.2"), "", "w2"),
    ("fd00::1", "", "w1"),
    ("10.0.0.1", "remote", "w3"),
    ("10.0.0.2", "remote", None),
    ("10.0.0.9", "", None),
    ("10.96.0.1", "", None),  # a VIP is no workload
])
def test_workload_by_ip(state, ip, network, uid):
    w = state.workload_by_ip(ip, network)
    assert (w.uid if w else None) == uid


def test_workload_by_uid(state):
    assert state.workload_by_uid("w2").name == "echo-2"
    assert state.workload_by_uid("nope") is None


@pytest.mark.parametrize("ip,network,key", [
    ("10.96.0.1", "", "default/echo"),
    ("::ffff:10.96.0.1", "", "default/echo"),
    ("10.96.0.1", "remote", "default/echo"),
    ("fd00:96::1", "", "default/echo"),
    (ip_address("10.96.0.2"), "", "default/lonely"),
    ("10.96.0.2", "remote", None),
    ("10.0.0.1", "", None),
])
def test_service_by_vip(state, ip, network, key):
    s = state.service_by_vip(ip, network)
    assert (s.key if s else None) == key


def test_service_by_key_and_listings(state):
    assert state.service_by_key("default/echo").name == "echo"
    assert state.service_by_key("echo") is None
    assert [w.uid for w in state.workloads()] == ["w1", "w2", "w3", "w4"]
    assert [s.key for s in state.services()] == ["default/echo", "default/lonely"]
    assert [p.key for p in state.policies()] == ["default/p"]
    assert [w.uid for w in state.workloads_on_node("node-a")] == ["w1", "w3", "w4"]
    assert [w.uid for w in state.workloads_on_node("node-b")] == ["w2"]
    assert state.workloads_on_node("node-z") == ()


def test_endpoints_in_config_order(state):
    eps = state.endpoints(state.service_by_key("default/echo"))
    assert [(e.workload.uid, dict(e.ports)) for e in eps] == [
        ("w1", {80: 8080}), ("w2", {}), ("w3", {}), ("w4", {})]
    assert state.endpoints(state.service_by_key("default/lonely")) == ()


def test_canonical_ip():
    assert canonical_ip("::ffff:1.2.3.4") == ip_address("1.2.3.4")
    assert canonical_ip(ip_address("::1")) == ip_address("::1")
    with pytest.raises(ValueError):
        canonical_ip("not-an-ip")


def _w(uid: str, ip: str | None = "10.0.0.1", network: str = "", **kw) -> Workload:
    return Workload(uid=uid, name=uid, namespace="n",
                    workload_ips=(ip_address(ip),) if ip else (), network=network, **kw)


@pytest.mark.parametrize("workloads,services,message", [
    ([_w("a"), _w("a", "10.0.0.2")], [], "duplicate workload uid"),
    ([_w("a"), _w("b")], [], "workloads 'a' and 'b'"),
    ([_w("a", "10.0.0.1"), _w("b", "::ffff:10.0.0.1")], [], "workloads 'a' and 'b'"),
    ([], [Service("a", "n", "h"), Service("b", "n", "h")], "duplicate service"),
    ([], [Service("a", "n", "h1", vips=(NetworkAddress("", ip_address("10.96.0.1")),)),
          Service("b", "n", "h2", vips=(NetworkAddress("", ip_address("10.96.0.1")),))], "VIP"),
])
def test_constructor_refuses_ambiguous_indexes(workloads, services, message):
    with pytest.raises(ValueError, match=message):
        ProxyState(workloads, services)


def test_same_ip_on_other_network_is_fine():
    state = ProxyState([_w("a"), _w("b", network="n2")])
    assert state.workload_by_ip("10.0.0.1").uid == "a"
    assert state.workload_by_ip("10.0.0.1", "n2").uid == "b"


SVC = Service("s", "n", "h", ports={80: 8000, 81: 0, 82: 8200})


@pytest.mark.parametrize("endpoint_ports,service_port,expected", [
    ({}, 80, 8000),  # service map
    ({80: 9000}, 80, 9000),  # endpoint's own map wins
    ({}, 81, 81),  # target 0 = same as service port
    ({81: 0}, 81, 81),
    ({82: 0}, 82, 82),  # endpoint's 0 also means "same port", not the service's 8200
    ({80: 9000}, 82, 8200),  # endpoint map without that port: service map
    ({}, 90, None),  # not a port of the service
    ({90: 9000}, 90, None),  # an endpoint cannot add ports to a service
])
def test_target_port(endpoint_ports, service_port, expected):
    assert target_port(SVC, Endpoint(_w("a"), endpoint_ports), service_port) == expected


def _rr_state(*workloads: Workload) -> ProxyState:
    return ProxyState(workloads, [SVC])


def _svc(*ports: tuple[int, int]) -> dict:
    return {SVC.key: dict(ports)}


def test_round_robin_alternates_and_wraps():
    state = _rr_state(_w("a", "10.0.0.1", services=_svc()), _w("b", "10.0.0.2", services=_svc((80, 9000))))
    rr = RoundRobin()
    picks = [(w.uid, port) for w, port in (rr.pick(state, SVC, 80) for _ in range(5))]
    assert picks == [("a", 8000), ("b", 9000), ("a", 8000), ("b", 9000), ("a", 8000)]


def test_round_robin_skips_unhealthy_addressless_and_portless():
    state = _rr_state(
        _w("sick", "10.0.0.1", services=_svc(), status=WorkloadStatus.UNHEALTHY),
        _w("a", "10.0.0.2", services=_svc()),
        _w("noip", None, services=_svc()),
        _w("b", "10.0.0.3", services=_svc()),
        _w("other-service", "10.0.0.4", services={"n/other": {80: 80}}),
    )
    rr = RoundRobin()
    assert [rr.pick(state, SVC, 80)[0].uid for _ in range(4)] == ["a", "b", "a", "b"]
    # 90 is no port of the service: nobody qualifies.
    assert rr.pick(state, SVC, 90) is None


def test_round_robin_counters_are_per_service():
    other = Service("o", "n", "other", ports={80: 80})
    state = ProxyState(
        [_w("a", "10.0.0.1", services={SVC.key: {}, other.key: {}}),
         _w("b", "10.0.0.2", services={SVC.key: {}, other.key: {}})],
        [SVC, other])
    rr = RoundRobin()
    assert rr.pick(state, SVC, 80)[0].uid == "a"
    assert rr.pick(state, other, 80)[0].uid == "a"
    assert rr.pick(state, SVC, 80)[0].uid == "b"
    assert rr.pick(state, other, 80)[0].uid == "b"


def test_round_robin_none_without_candidates():
    rr = RoundRobin()
    assert rr.pick(_rr_state(), SVC, 80) is None
    sick = _rr_state(_w("a", services=_svc(), status=WorkloadStatus.UNHEALTHY))
    assert rr.pick(sick, SVC, 80) is None


def test_round_robin_survives_a_shrinking_candidate_set():
    rr = RoundRobin()
    three = _rr_state(*(_w(u, f"10.0.0.{i}", services=_svc()) for i, u in enumerate("abc", 1)))
    assert [rr.pick(three, SVC, 80)[0].uid for _ in range(3)] == ["a", "b", "c"]
    two = _rr_state(*(_w(u, f"10.0.0.{i}", services=_svc()) for i, u in enumerate("ab", 1)))
    # The counter carries on (3 % 2): no IndexError, no restart, still alternating.
    assert [rr.pick(two, SVC, 80)[0].uid for _ in range(3)] == ["b", "a", "b"]


def test_round_robin_on_local_config(state):
    echo = state.service_by_key("default/echo")
    rr = RoundRobin()
    picks = [(w.uid, port) for w, port in (rr.pick(state, echo, 80) for _ in range(4))]
    # w4 has no IP; w1 has its own target port.
    assert picks == [("w1", 8080), ("w2", 8000), ("w3", 8000), ("w1", 8080)]
    assert rr.pick(state, echo, 81)[1] == 81
    assert rr.pick(state, echo, 443) is None
