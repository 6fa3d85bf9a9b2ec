"""istio.workload.Address / istio.security.Authorization <-> state models (xds/convert.py), no I/O."""

from __future__ import annotations

import textwrap
from ipaddress import ip_address, ip_network

import pytest
from google.protobuf import wrappers_pb2

from ztunnel_fast.protos import authorization_pb2 as apb
from ztunnel_fast.protos import workload_pb2 as wpb
from ztunnel_fast.state.policy import Action, Scope, StringMatchKind
from ztunnel_fast.state.service import Service
from ztunnel_fast.state.workload import GatewayAddress, TunnelProtocol, Workload, WorkloadStatus
from ztunnel_fast.xds import convert
from ztunnel_fast.xds.convert import Rejected
from ztunnel_fast.xds.local import parse_local_config

LOCAL = textwrap.dedent("""\
    workloads:
    - uid: Kubernetes//Pod/demo/a
      name: a
      namespace: demo
      workloadIps: ["10.0.0.1", "fd00::1"]
      protocol: HBONE
      trustDomain: example.org
      serviceAccount: sa-a
      network: net1
      node: node1
      clusterId: c1
      workloadName: a-deploy
      workloadType: job
      canonicalName: a-canon
      canonicalRevision: v2
      status: Unhealthy
      locality: {region: r, zone: z, subzone: s}
      services: {demo/echo.demo.svc.cluster.local: {80: 8080, 81: 0}}
      authorizationPolicies: [demo/p1]
      capacity: 7
    - uid: w2
      name: b
      namespace: demo
      workloadIps: ["10.0.0.2"]
    services:
    - name: echo
      namespace: demo
      hostname: echo.demo.svc.cluster.local
      vips: ["/10.96.0.1", "net1/fd00:96::1"]
      ports: {80: 8080, 443: 0}
      subjectAltNames: ["spiffe://cluster.local/ns/demo/sa/other"]
      canonical: true
    policies:
    - name: p1
      namespace: demo
      scope: WorkloadSelector
      action: Deny
      dryRun: true
      rules:
      - - - namespaces: [{Exact: demo}]
            notNamespaces: [{Prefix: kube-}]
            principals: [{Suffix: /sa/sleep}, Presence]
            notPrincipals: [{Exact: cluster.local/ns/x/sa/y}]
            serviceAccounts: [{namespace: demo, serviceAccount: sleep}]
            notServiceAccounts: [{namespace: demo, serviceAccount: bad}]
            sourceIps: ["10.0.0.0/8", "fd00::/64"]
            notSourceIps: ["10.1.2.3"]
            destinationIps: ["192.168.0.0/16"]
            notDestinationIps: ["::1"]
            destinationPorts: [80, 8080]
            notDestinationPorts: [22]
        - - principals: [Presence]
      - - []
    - name: global
      namespace: istio-system
      scope: Global
      action: Allow
""")


@pytest.fixture(scope="module")
def local():
    return parse_local_config(LOCAL, "test")


def test_every_model_round_trips_through_istios_messages(local):
    for w in local.workloads:
        wire = wpb.Address.FromString(convert.workload_to_proto(w).SerializeToString())
        assert convert.address_from_proto(w.uid, wire) == w
    for s in local.services:
        wire = wpb.Address.FromString(convert.service_to_proto(s).SerializeToString())
        assert convert.address_from_proto(s.key, wire) == s
    for p in local.policies:
        wire = apb.Authorization.FromString(convert.authorization_to_proto(p).SerializeToString())
        assert convert.authorization_from_proto(p.key, wire) == p


def test_workload_fields_and_ztunnel_defaults():
    w = convert.address_from_proto("u1", wpb.Address(workload=wpb.Workload(
        uid="u1", name="n", namespace="ns",
        addresses=[bytes([10, 0, 0, 9]), ip_address("fd00::9").packed, ip_address("::ffff:10.0.0.10").packed],
        tunnel_protocol=wpb.HBONE, workload_type=wpb.POD,
        waypoint=wpb.GatewayAddress(address=wpb.NetworkAddress(network="n1", address=bytes([10, 1, 0, 1]))),
    )))
    assert isinstance(w, Workload)
    # IPv4-mapped IPv6 folds to IPv4, as the state indexes expect
    assert w.workload_ips == (ip_address("10.0.0.9"), ip_address("fd00::9"), ip_address("10.0.0.10"))
    assert w.protocol is TunnelProtocol.HBONE and w.workload_type == "pod"
    assert (w.trust_domain, w.service_account, w.capacity, w.cluster_id) == ("cluster.local", "default", 1, "Kubernetes")
    assert w.status is WorkloadStatus.HEALTHY
    assert w.waypoint == GatewayAddress(network="n1", address=ip_address("10.1.0.1"), hbone_mtls_port=15008)
    assert w.waypoint.destination == "n1/10.1.0.1"
    zero = convert.address_from_proto("u2", wpb.Address(workload=wpb.Workload(
        uid="u2", capacity=wrappers_pb2.UInt32Value(value=0))))
    assert zero.capacity == 0  # present but 0 is not "absent"
    assert zero.protocol is TunnelProtocol.TCP  # NONE


def test_service_fields():
    s = convert.address_from_proto("demo/h", wpb.Address(service=wpb.Service(
        name="h", namespace="demo", hostname="h",
        addresses=[wpb.NetworkAddress(address=bytes([10, 96, 0, 1])),
                   wpb.NetworkAddress(network="n", address=ip_address("fd00::1").packed, length=128),
                   wpb.NetworkAddress(address=bytes([10, 97, 0, 0]), length=16)],  # CIDR VIP: left out
        ports=[wpb.Port(service_port=80, target_port=8080, app_protocol=wpb.HTTP11), wpb.Port(service_port=90)],
        waypoint=wpb.GatewayAddress(hostname=wpb.NamespacedHostname(namespace="demo", hostname="wp"),
                                    hbone_mtls_port=15009),
    )))
    assert isinstance(s, Service)
    assert [str(v) for v in s.vips] == ["/10.96.0.1", "n/fd00::1"]
    assert dict(s.ports) == {80: 8080, 90: 0}
    assert s.waypoint.destination == "demo/wp" and s.waypoint.hbone_mtls_port == 15009


def test_policy_fields():
    p = convert.authorization_from_proto("ns/p", apb.Authorization(
        name="p", namespace="ns", scope=apb.NAMESPACE, action=apb.ALLOW,
        rules=[apb.Rule(clauses=[apb.Clause(matches=[apb.Match(
            source_ips=[apb.Address(address=bytes([10, 1, 2, 3]), length=8)],
            not_principals=[apb.StringMatch(presence={})],
        )])])]))
    assert p.scope is Scope.NAMESPACE and p.action is Action.ALLOW
    (((m,),),) = p.rules
    assert m.source_ips == (ip_network("10.0.0.0/8"),)  # host bits dropped, as the local parser does
    assert m.not_principals[0].kind is StringMatchKind.PRESENCE


@pytest.mark.parametrize("name, address, reason", [
    ("u", wpb.Address(workload=wpb.Workload(uid="u", addresses=[b"\x0a\x00\x00"])),
     "u: workload.addresses[0]: invalid IP address: 3 bytes (expected 4 or 16)"),
    ("u", wpb.Address(workload=wpb.Workload(uid="u", tunnel_protocol=wpb.LEGACY_ISTIO_MTLS)),
     "u: workload.tunnel_protocol: unsupported TunnelProtocol LEGACY_ISTIO_MTLS"),
    ("u", wpb.Address(workload=wpb.Workload(uid="u", tunnel_protocol=9)),
     "u: workload.tunnel_protocol: unsupported TunnelProtocol 9"),
    ("", wpb.Address(workload=wpb.Workload(name="x")), ": workload.uid: missing uid"),
    ("other", wpb.Address(workload=wpb.Workload(uid="u")), "other: workload.uid: 'u' differs from the resource name"),
    ("u", wpb.Address(workload=wpb.Workload(uid="u", services={"nohost": wpb.PortList()})),
     "u: workload.services[nohost]: invalid key 'nohost'; expected <namespace>/<hostname>"),
    ("u", wpb.Address(), "u: Address holds neither a workload nor a service"),
    ("ns/h", wpb.Address(service=wpb.Service(namespace="ns", hostname="h", ports=[wpb.Port(service_port=70000)])),
     "ns/h: service.ports[0].service_port: service port 70000 out of range; accepted: 1..65535"),
    ("ns/h", wpb.Address(service=wpb.Service(namespace="ns", hostname="h", subject_alt_names=["bob"])),
     "ns/h: service.subject_alt_names[0]: not a SPIFFE id: 'bob'"),
    ("ns/h", wpb.Address(service=wpb.Service(namespace="ns", hostname="h", addresses=[wpb.NetworkAddress()])),
     "ns/h: service.addresses[0].address: invalid IP address: 0 bytes (expected 4 or 16)"),
])
def test_address_rejections_name_the_resource_and_reason(name, address, reason):
    with pytest.raises(Rejected) as info:
        convert.address_from_proto(name, address)
    assert str(info.value) == reason


@pytest.mark.parametrize("policy, reason", [
    (apb.Authorization(name="p", namespace="ns", action=7), "ns/p: action: unsupported Action 7"),
    (apb.Authorization(name="p", namespace="ns", rules=[apb.Rule(clauses=[apb.Clause(matches=[
        apb.Match(principals=[apb.StringMatch()])])])]),
     "ns/p: rules[0].clauses[0].matches[0].principals[0]: string match has no exact, prefix, suffix or presence"),
    (apb.Authorization(name="p", namespace="ns", rules=[apb.Rule(clauses=[apb.Clause(matches=[
        apb.Match(source_ips=[apb.Address(address=bytes(4), length=33)])])])]),
     "ns/p: rules[0].clauses[0].matches[0].source_ips[0].length: prefix length 33 out of range; accepted: 0..32"),
    (apb.Authorization(name="p", namespace="ns", rules=[apb.Rule(clauses=[apb.Clause(matches=[
        apb.Match(destination_ports=[0])])])]),
     "ns/p: rules[0].clauses[0].matches[0].destination_ports[0]: port 0 out of range; accepted: 1..65535"),
    (apb.Authorization(name="q", namespace="ns"), "ns/p: namespace/name 'ns/q' differs from the resource name"),
])
def test_policy_rejections(policy, reason):
    with pytest.raises(Rejected) as info:
        convert.authorization_from_proto("ns/p", policy)
    assert str(info.value) == reason


def test_waypoints_show_in_config_dump_in_the_local_config_shape():
    from ztunnel_fast.state.dump import service_json, workload_json
    from ztunnel_fast.state.store import ProxyState

    w = convert.address_from_proto("u", wpb.Address(workload=wpb.Workload(uid="u", waypoint=wpb.GatewayAddress(
        address=wpb.NetworkAddress(network="n1", address=bytes([10, 1, 0, 1])), hbone_mtls_port=15009))))
    assert workload_json(w)["waypoint"] == {"destination": "n1/10.1.0.1", "hboneMtlsPort": 15009}
    s = convert.address_from_proto("ns/h", wpb.Address(service=wpb.Service(namespace="ns", hostname="h", waypoint=(
        wpb.GatewayAddress(hostname=wpb.NamespacedHostname(namespace="ns", hostname="wp"))))))
    assert service_json(s, ProxyState())["waypoint"] == {"destination": "ns/wp", "hboneMtlsPort": 15008}
    plain = convert.address_from_proto("v", wpb.Address(workload=wpb.Workload(uid="v")))
    assert "waypoint" not in workload_json(plain)


def test_weighted_waypoints_and_application_tunnel_convert_both_ways():
    from ztunnel_fast.state.workload import ApplicationTunnel, ApplicationTunnelProtocol, WeightedWaypoint

    gw = wpb.GatewayAddress(address=wpb.NetworkAddress(network="", address=bytes([10, 1, 0, 1])))
    s = convert.address_from_proto("ns/h", wpb.Address(service=wpb.Service(
        namespace="ns", hostname="h",
        weighted_waypoints=[wpb.WeightedWaypoint(destination=gw, weight=3),
                            wpb.WeightedWaypoint(destination=wpb.GatewayAddress(
                                hostname=wpb.NamespacedHostname(namespace="ns", hostname="wp2"), hbone_mtls_port=15009),
                                weight=1)])))
    assert s.weighted_waypoints == (
        WeightedWaypoint(GatewayAddress(address=ip_address("10.1.0.1")), 3),
        WeightedWaypoint(GatewayAddress(namespace="ns", hostname="wp2", hbone_mtls_port=15009), 1),
    )
    assert convert.address_from_proto("ns/h", convert.service_to_proto(s)) == s

    w = convert.address_from_proto("u", wpb.Address(workload=wpb.Workload(
        uid="u", application_tunnel=wpb.ApplicationTunnel(protocol=wpb.ApplicationTunnel.PROXY, port=15088))))
    assert w.application_tunnel == ApplicationTunnel(ApplicationTunnelProtocol.PROXY, 15088)
    assert convert.address_from_proto("u", convert.workload_to_proto(w)) == w


def test_bad_application_tunnel_and_weighted_waypoint_are_rejected():
    with pytest.raises(Rejected) as info:
        convert.address_from_proto("u", wpb.Address(workload=wpb.Workload(
            uid="u", application_tunnel=wpb.ApplicationTunnel(protocol=wpb.ApplicationTunnel.PROXY, port=70000))))
    assert "application_tunnel.port" in str(info.value) and "out of range" in str(info.value)
    with pytest.raises(Rejected) as info:
        convert.address_from_proto("ns/h", wpb.Address(service=wpb.Service(
            namespace="ns", hostname="h", weighted_waypoints=[wpb.WeightedWaypoint(weight=1)])))
    assert "weighted_waypoints[0].destination" in str(info.value)
