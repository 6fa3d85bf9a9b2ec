"""The outbound routing decision, table-driven, without sockets."""

from ipaddress import ip_address

import pytest

from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.proxy.route import Kind, decide
from ztunnel_fast.state.store import ProxyState, RoundRobin
from ztunnel_fast.xds.local import parse_local_config

CONFIG = """
workloads:
- {uid: sleep, name: sleep, namespace: demo, serviceAccount: sleep, workloadIps: [198.18.0.1], protocol: HBONE, node: n1}
- {uid: httpbin-1, name: httpbin-1, namespace: demo, serviceAccount: httpbin, workloadIps: [198.18.0.2], protocol: HBONE, node: n2,
   services: {demo/httpbin.demo.svc.cluster.local: {8000: 80}}}
- {uid: httpbin-2, name: httpbin-2, namespace: demo, serviceAccount: httpbin, workloadIps: [198.18.0.3], protocol: HBONE, node: n1,
   services: {demo/httpbin.demo.svc.cluster.local: {8000: 80}}}
- {uid: legacy, name: legacy, namespace: demo, workloadIps: [198.18.0.4], protocol: TCP, node: n2,
   services: {demo/legacy.demo.svc.cluster.local: {9000: 9090}}}
services:
- {name: httpbin, namespace: demo, hostname: httpbin.demo.svc.cluster.local, vips: [/198.19.0.10], ports: {8000: 80},
   subjectAltNames: [spiffe://cluster.local/ns/demo/sa/httpbin-extra]}
- {name: legacy, namespace: demo, hostname: legacy.demo.svc.cluster.local, vips: [/198.19.0.11], ports: {9000: 9090}}
- {name: empty, namespace: demo, hostname: empty.demo.svc.cluster.local, vips: [/198.19.0.12], ports: {80: 80}}
"""


@pytest.fixture
def state():
    return ProxyState.from_local(parse_local_config(CONFIG, "test"))


def ip(s):
    return ip_address(s)


def route(state, dst, port, lb=None, source_uid="sleep", fast_path_node=None):
    return decide(state, lb or RoundRobin(), source=state.workload_by_uid(source_uid),
                  dst_ip=ip(dst), dst_port=port, fast_path_node=fast_path_node)


def test_mesh_workload_goes_hbone_to_15008_with_pod_authority(state):
    r = route(state, "198.18.0.2", 80)
    assert r.kind is Kind.HBONE
    assert r.next_hop == (ip("198.18.0.2"), 15008)
    assert r.authority == "198.18.0.2:80"
    assert r.identities == (Identity("cluster.local", "demo", "httpbin"),)
    assert r.service is None and r.workload.uid == "httpbin-1"


def test_service_vip_round_robins_and_translates_port(state):
    lb = RoundRobin()
    picks = [route(state, "198.19.0.10", 8000, lb) for _ in range(4)]
    assert [p.authority for p in picks] == ["198.18.0.2:80", "198.18.0.3:80"] * 2
    assert all(p.kind is Kind.HBONE and p.service.name == "httpbin" for p in picks)
    # workload identity first, then the service's extra SANs
    assert picks[0].identities == (Identity("cluster.local", "demo", "httpbin"),
                                   Identity("cluster.local", "demo", "httpbin-extra"))


def test_non_mesh_workload_goes_plain_tcp(state):
    r = route(state, "198.18.0.4", 9090)
    assert r.kind is Kind.TCP and r.next_hop == (ip("198.18.0.4"), 9090) and r.authority is None


def test_non_mesh_service_translates_port(state):
    r = route(state, "198.19.0.11", 9000)
    assert r.kind is Kind.TCP and r.target == (ip("198.18.0.4"), 9090)


def test_unknown_address_is_passthrough_to_original_destination(state):
    r = route(state, "198.18.0.99", 5432)
    assert r.kind is Kind.PASSTHROUGH and r.target == (ip("198.18.0.99"), 5432) and r.next_hop == r.target


def test_known_service_without_endpoint_is_refused(state):
    r = route(state, "198.19.0.12", 80)
    assert r.kind is Kind.REFUSE and "no healthy upstream" in r.reason


def test_service_port_not_on_service_is_refused(state):
    r = route(state, "198.19.0.10", 9999)
    assert r.kind is Kind.REFUSE


@pytest.mark.parametrize("dst,port", [("127.0.0.1", 15001), ("127.0.0.1", 15006), ("127.0.0.1", 15008),
                                      ("::1", 15008), ("198.18.0.1", 15001), ("198.18.0.1", 15008)])
def test_never_connect_to_own_ports(state, dst, port):
    r = route(state, dst, port)
    assert r.kind is Kind.REFUSE and "self call" in r.reason


def test_other_pods_15008_is_not_a_self_call(state):
    assert route(state, "198.18.0.2", 15008).kind is Kind.HBONE


def test_node_local_fast_path_only_for_same_node_mesh_workloads(state):
    assert route(state, "198.18.0.3", 80, fast_path_node="n1").kind is Kind.NODE_LOCAL
    assert route(state, "198.18.0.2", 80, fast_path_node="n1").kind is Kind.HBONE
    assert route(state, "198.18.0.3", 80, fast_path_node=None).kind is Kind.HBONE
    # a non-mesh workload on the same node stays plain TCP
    assert route(state, "198.18.0.4", 9090, fast_path_node="n2").kind is Kind.TCP
