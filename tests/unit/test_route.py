"""The outbound routing decision, table-driven, without sockets."""

import dataclasses
import random
from ipaddress import ip_address

import pytest

from ztunnel_fast.hbone.pool import PoolKey
from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.proxy.route import Kind, Via, decide, from_waypoint, service_waypoint
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


# --- waypoints ------------------------------------------------------------------------------------

WAYPOINTS = """
workloads:
- {uid: sleep, name: sleep, namespace: demo, serviceAccount: sleep, workloadIps: [198.18.0.1], protocol: HBONE, node: n1}
- {uid: wp, name: waypoint, namespace: demo, serviceAccount: waypoint, workloadIps: [198.18.0.50], protocol: HBONE,
   node: n2, services: {demo/waypoint.demo.svc.cluster.local: {15008: 15008}}}
- {uid: wp-canary, name: waypoint-canary, namespace: demo, serviceAccount: waypoint-canary, workloadIps: [198.18.0.51],
   protocol: HBONE, node: n2}
- {uid: httpbin-1, name: httpbin-1, namespace: demo, serviceAccount: httpbin, workloadIps: [198.18.0.2], protocol: HBONE,
   node: n2, services: {demo/httpbin.demo.svc.cluster.local: {8000: 80}, demo/echo.demo.svc.cluster.local: {9000: 90},
              demo/direct.demo.svc.cluster.local: {6000: 60}},
   waypoint: {hostname: {namespace: demo, hostname: waypoint.demo.svc.cluster.local}}}
- {uid: plain, name: plain, namespace: demo, serviceAccount: plain, workloadIps: [198.18.0.3], protocol: HBONE, node: n2,
   services: {demo/nowp.demo.svc.cluster.local: {7000: 70}}}
- {uid: lost, name: lost, namespace: demo, workloadIps: [198.18.0.4], protocol: HBONE, node: n2,
   waypoint: {address: /198.18.0.99}}
services:
- {name: httpbin, namespace: demo, hostname: httpbin.demo.svc.cluster.local, vips: [/198.19.0.10], ports: {8000: 80},
   waypoint: {address: /198.18.0.50, hboneMtlsPort: 15008}}
- {name: echo, namespace: demo, hostname: echo.demo.svc.cluster.local, vips: [/198.19.0.11], ports: {9000: 90},
   waypoint: {hostname: {namespace: demo, hostname: waypoint.demo.svc.cluster.local}, hboneMtlsPort: 15009}}
- {name: waypoint, namespace: demo, hostname: waypoint.demo.svc.cluster.local, vips: [/198.19.0.50], ports: {15008: 15008},
   subjectAltNames: [spiffe://cluster.local/ns/demo/sa/waypoint-extra]}
- {name: direct, namespace: demo, hostname: direct.demo.svc.cluster.local, vips: [/198.19.0.15], ports: {6000: 60}}
- {name: nowp, namespace: demo, hostname: nowp.demo.svc.cluster.local, vips: [/198.19.0.12], ports: {7000: 70}}
- {name: canary, namespace: demo, hostname: canary.demo.svc.cluster.local, vips: [/198.19.0.13], ports: {80: 80},
   waypoint: {address: /198.18.0.50},
   weightedWaypoints: [{destination: {address: /198.18.0.50}, weight: 3}, {destination: {address: /198.18.0.51}, weight: 1},
                       {destination: {address: /198.18.0.99}, weight: 0}]}
- {name: gone, namespace: demo, hostname: gone.demo.svc.cluster.local, vips: [/198.19.0.14], ports: {80: 80},
   waypoint: {hostname: {namespace: demo, hostname: missing.demo.svc.cluster.local}}}
"""

WAYPOINT_ID = Identity("cluster.local", "demo", "waypoint")


@pytest.fixture
def wstate():
    return ProxyState.from_local(parse_local_config(WAYPOINTS, "test"))


def test_service_with_waypoint_goes_to_the_waypoint_with_the_original_vip_as_authority(wstate):
    r = route(wstate, "198.19.0.10", 8000)
    assert r.kind is Kind.HBONE and r.via is Via.SERVICE_WAYPOINT
    assert r.next_hop == (ip("198.18.0.50"), 15008)
    assert r.authority == "198.19.0.10:8000"  # not translated to the target port
    assert r.identities == (WAYPOINT_ID,)
    assert r.workload.uid == "wp" and r.service.name == "httpbin"
    assert r.waypoint.destination == "/198.18.0.50"


def test_waypoint_by_hostname_is_resolved_through_its_service_on_its_hbone_port(wstate):
    r = route(wstate, "198.19.0.11", 9000)
    assert r.kind is Kind.HBONE and r.via is Via.SERVICE_WAYPOINT
    assert r.next_hop == (ip("198.18.0.50"), 15009)
    assert r.authority == "198.19.0.11:9000"
    # the waypoint workload's identity, then its service's SANs
    assert r.identities == (WAYPOINT_ID, Identity("cluster.local", "demo", "waypoint-extra"))


def test_workload_with_waypoint_goes_to_the_waypoint_with_the_pod_authority(wstate):
    r = route(wstate, "198.18.0.2", 80)
    assert r.kind is Kind.HBONE and r.via is Via.WORKLOAD_WAYPOINT
    assert r.next_hop == (ip("198.18.0.50"), 15008)
    assert r.authority == "198.18.0.2:80"
    assert r.workload.uid == "wp"


def test_traffic_from_the_waypoint_itself_goes_direct(wstate):
    r = route(wstate, "198.18.0.2", 80, source_uid="wp")
    assert r.kind is Kind.HBONE and r.via is Via.DIRECT
    assert r.next_hop == (ip("198.18.0.2"), 15008) and r.workload.uid == "httpbin-1"
    assert from_waypoint(wstate, wstate.workload_by_uid("httpbin-1").waypoint,
                         wstate.workload_by_uid("wp"))


def test_waypoint_identity_on_another_ip_or_another_identity_on_its_ip_is_not_the_waypoint(wstate):
    gateway = wstate.workload_by_uid("httpbin-1").waypoint
    wp = wstate.workload_by_uid("wp")
    elsewhere = dataclasses.replace(wp, uid="x", workload_ips=(ip("198.18.0.77"),))
    other_sa = dataclasses.replace(wp, uid="y", service_account="sleep")
    assert not from_waypoint(wstate, gateway, elsewhere)
    assert not from_waypoint(wstate, gateway, other_sa)
    assert not from_waypoint(wstate, gateway, None)


def test_service_without_waypoint_to_an_endpoint_with_a_waypoint_goes_to_the_workload_waypoint(wstate):
    r = route(wstate, "198.19.0.15", 6000)
    assert r.kind is Kind.HBONE and r.via is Via.WORKLOAD_WAYPOINT
    assert r.next_hop == (ip("198.18.0.50"), 15008)
    assert r.authority == "198.18.0.2:60"  # the picked endpoint, target port (ztunnel's workload address)
    assert r.service.name == "direct"


def test_service_and_endpoint_without_waypoints_go_direct(wstate):
    r = route(wstate, "198.19.0.12", 7000)
    assert r.kind is Kind.HBONE and r.via is Via.DIRECT and r.authority == "198.18.0.3:70"


def test_missing_waypoint_is_refused_with_a_clear_reason(wstate):
    r = route(wstate, "198.19.0.14", 80)
    assert r.kind is Kind.REFUSE
    assert r.reason == "unknown waypoint: demo/missing.demo.svc.cluster.local (no healthy upstream)"
    r = route(wstate, "198.18.0.4", 80)
    assert r.kind is Kind.REFUSE and "unknown waypoint: /198.18.0.99" in r.reason


def test_weighted_waypoints_are_sampled_by_weight_per_connection(wstate):
    rng = random.Random(1234)
    hops = [route_rng(wstate, rng).next_hop[0] for _ in range(4000)]
    main, canary = hops.count(ip("198.18.0.50")), hops.count(ip("198.18.0.51"))
    assert main + canary == 4000  # weight 0 is never picked
    # 3:1 within a wide band (a seeded generator: the same draws every run)
    assert 2800 < main < 3200 and 800 < canary < 1200


def route_rng(state, rng):
    return decide(state, RoundRobin(), source=state.workload_by_uid("sleep"), dst_ip=ip("198.19.0.13"),
                  dst_port=80, rng=rng)


def test_weighted_draw_boundaries():
    svc = ProxyState.from_local(parse_local_config(WAYPOINTS, "t")).service_by_vip(ip("198.19.0.13"))

    class Fixed:
        def __init__(self, n):
            self.n = n

        def randrange(self, total):
            assert total == 4
            return self.n

    assert [service_waypoint(svc, Fixed(n)).address for n in range(4)] == [ip("198.18.0.50")] * 3 + [ip("198.18.0.51")]


def test_zero_total_weight_falls_back_to_the_plain_waypoint():
    cfg = WAYPOINTS.replace("weight: 3", "weight: 0").replace("weight: 1}", "weight: 0}")
    svc = ProxyState.from_local(parse_local_config(cfg, "t")).service_by_vip(ip("198.19.0.13"))
    assert service_waypoint(svc, random.Random(1)).address == ip("198.18.0.50")


def test_services_behind_one_waypoint_share_a_pool_key(wstate):
    a = route(wstate, "198.19.0.10", 8000)
    src = Identity("cluster.local", "demo", "sleep")
    # canary may sample the other waypoint: draw until it picks the shared one
    rng = random.Random(7)
    b = next(r for r in (route_rng(wstate, rng) for _ in range(50)) if r.next_hop[0] == ip("198.18.0.50"))
    assert a.authority != b.authority
    assert PoolKey.of(src, a.identities, a.next_hop) == PoolKey.of(src, b.identities, b.next_hop)
    direct = route(wstate, "198.18.0.3", 70)
    assert PoolKey.of(src, direct.identities, direct.next_hop) != PoolKey.of(src, a.identities, a.next_hop)


def test_waypoint_routes_skip_the_node_local_fast_path(wstate):
    assert route(wstate, "198.19.0.10", 8000, fast_path_node="n2").via is Via.SERVICE_WAYPOINT


def test_inbound_accepts_authorities_the_local_waypoint_fronts(wstate):
    from ztunnel_fast.proxy.route import is_waypoint_for
    wp, canary, plain = (wstate.workload_by_uid(u) for u in ("wp", "wp-canary", "plain"))
    assert is_waypoint_for(wstate, wp, ip("198.19.0.10"))  # service VIP, waypoint by address
    assert is_waypoint_for(wstate, wp, ip("198.19.0.11"))  # service VIP, waypoint by hostname
    assert is_waypoint_for(wstate, wp, ip("198.18.0.2"))  # workload with that waypoint
    assert is_waypoint_for(wstate, canary, ip("198.19.0.13"))  # one of the weighted waypoints
    assert not is_waypoint_for(wstate, canary, ip("198.19.0.10"))
    assert not is_waypoint_for(wstate, plain, ip("198.19.0.10"))
    assert not is_waypoint_for(wstate, wp, ip("198.19.0.12"))  # a service without a waypoint
    assert not is_waypoint_for(wstate, wp, ip("203.0.113.1"))  # unknown address
