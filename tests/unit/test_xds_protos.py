"""Wire facts of istio.workload and istio.security as declared in protos/ (reference 4.2, 5.2, 5.3).

Checked through the descriptors (names, numbers, enum values, reserved slots) and by encoding:
a message built here must produce the bytes Istio's field numbers imply.
"""

from google.protobuf import any_pb2, descriptor_pb2, wrappers_pb2
from google.protobuf.descriptor import FieldDescriptor

from ztunnel_fast.protos import authorization_pb2 as apb
from ztunnel_fast.protos import workload_pb2 as wpb


def numbers(message) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def enum_values(enum) -> dict[str, int]:
    return {v.name: v.number for v in enum.DESCRIPTOR.values}


def test_full_names_and_type_urls():
    assert wpb.Address.DESCRIPTOR.full_name == "istio.workload.Address"
    assert apb.Authorization.DESCRIPTOR.full_name == "istio.security.Authorization"
    packed = any_pb2.Any()
    packed.Pack(wpb.Address(workload=wpb.Workload(uid="u")))
    assert packed.type_url == "type.googleapis.com/istio.workload.Address"
    packed.Pack(apb.Authorization(name="p"))
    assert packed.type_url == "type.googleapis.com/istio.security.Authorization"


def test_address_oneof():
    assert numbers(wpb.Address) == {"workload": 1, "service": 2}
    assert [f.name for f in wpb.Address.DESCRIPTOR.oneofs_by_name["type"].fields] == ["workload", "service"]


def test_workload_field_numbers():
    assert numbers(wpb.Workload) == {
        "uid": 20, "name": 1, "namespace": 2, "addresses": 3, "hostname": 21, "network": 4,
        "tunnel_protocol": 5, "trust_domain": 6, "service_account": 7, "waypoint": 8,
        "network_gateway": 19, "node": 9, "canonical_name": 10, "canonical_revision": 11,
        "workload_type": 12, "workload_name": 13, "native_tunnel": 14, "application_tunnel": 23,
        "services": 22, "authorization_policies": 16, "status": 17, "cluster_id": 18,
        "locality": 24, "network_mode": 25, "extensions": 26, "capacity": 27,
    }
    fields = wpb.Workload.DESCRIPTOR.fields_by_name
    assert fields["addresses"].type == FieldDescriptor.TYPE_BYTES
    assert fields["waypoint"].message_type.full_name == "istio.workload.GatewayAddress"
    assert fields["capacity"].message_type.full_name == "google.protobuf.UInt32Value"
    assert fields["services"].message_type.GetOptions().map_entry
    # 15 (virtual_ips) is reserved: no field may reuse it.
    assert 15 not in numbers(wpb.Workload).values()
    assert reserved(wpb.Workload) == ([15], ["virtual_ips"])


def reserved(message) -> tuple[list[int], list[str]]:
    """Reserved numbers and names of a message, from the compiled file descriptor."""
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(message.DESCRIPTOR.file.serialized_pb)
    (msg,) = [m for m in file_proto.message_type if m.name == message.DESCRIPTOR.name]
    return [n for r in msg.reserved_range for n in range(r.start, r.end)], list(msg.reserved_name)


def test_service_and_parts_field_numbers():
    assert numbers(wpb.Service) == {
        "name": 1, "namespace": 2, "hostname": 3, "addresses": 4, "ports": 5,
        "subject_alt_names": 6, "waypoint": 7, "load_balancing": 8, "ip_families": 9,
        "extensions": 10, "canonical": 11, "ingress_use_waypoint": 12, "weighted_waypoints": 13,
        "visibility": 14,
    }
    assert numbers(wpb.NetworkAddress) == {"network": 1, "address": 2, "length": 3}
    assert wpb.NetworkAddress.DESCRIPTOR.fields_by_name["length"].has_presence
    assert numbers(wpb.NamespacedHostname) == {"namespace": 1, "hostname": 2}
    assert numbers(wpb.GatewayAddress) == {"hostname": 1, "address": 2, "hbone_mtls_port": 3}
    assert reserved(wpb.GatewayAddress) == ([4], ["hbone_single_tls_port"])
    assert numbers(wpb.WeightedWaypoint) == {"destination": 1, "weight": 2}
    assert numbers(wpb.Port) == {"service_port": 1, "target_port": 2, "app_protocol": 3}
    assert numbers(wpb.PortList) == {"ports": 1}
    assert numbers(wpb.Locality) == {"region": 1, "zone": 2, "subzone": 3}
    assert numbers(wpb.ApplicationTunnel) == {"protocol": 1, "port": 2}
    assert numbers(wpb.LoadBalancing) == {"routing_preference": 1, "mode": 2, "health_policy": 3}
    assert numbers(wpb.Extension) == {"name": 1, "config": 2}


def test_workload_enums():
    assert enum_values(wpb.TunnelProtocol) == {"NONE": 0, "HBONE": 1, "LEGACY_ISTIO_MTLS": 2}
    assert enum_values(wpb.WorkloadStatus) == {"HEALTHY": 0, "UNHEALTHY": 1}
    assert enum_values(wpb.WorkloadType) == {"DEPLOYMENT": 0, "CRONJOB": 1, "POD": 2, "JOB": 3}
    assert enum_values(wpb.NetworkMode) == {"STANDARD": 0, "HOST_NETWORK": 1}
    assert enum_values(wpb.IPFamilies) == {"AUTOMATIC": 0, "IPV4_ONLY": 1, "IPV6_ONLY": 2, "DUAL": 3}
    assert enum_values(wpb.AppProtocol) == {"UNKNOWN": 0, "HTTP11": 1, "HTTP2": 2, "GRPC": 3, "TCP": 4, "TLS": 5}
    assert enum_values(wpb.Service.Visibility) == {"PUBLIC": 0, "NAMESPACE": 1}
    assert enum_values(wpb.ApplicationTunnel.Protocol) == {"NONE": 0, "PROXY": 1}
    assert enum_values(wpb.LoadBalancing.Scope) == {
        "UNSPECIFIED_SCOPE": 0, "REGION": 1, "ZONE": 2, "SUBZONE": 3, "NODE": 4, "CLUSTER": 5, "NETWORK": 6}
    assert enum_values(wpb.LoadBalancing.Mode) == {"UNSPECIFIED_MODE": 0, "STRICT": 1, "FAILOVER": 2, "PASSTHROUGH": 3}
    assert enum_values(wpb.LoadBalancing.HealthPolicy) == {"ONLY_HEALTHY": 0, "ALLOW_ALL": 1}


def test_workload_encoding_uses_istio_numbers():
    # uid = 20 (tag 0xa2 0x01), addresses = 3 (tag 0x1a), capacity = 27 (tag 0xda 0x01).
    w = wpb.Workload(uid="u", addresses=[bytes([10, 0, 0, 1])], capacity=wrappers_pb2.UInt32Value(value=3))
    assert w.SerializeToString() == b"\x1a\x04\x0a\x00\x00\x01" + b"\xa2\x01\x01u" + b"\xda\x01\x02\x08\x03"


def test_authorization_field_numbers_and_enums():
    assert numbers(apb.Authorization) == {
        "name": 1, "namespace": 2, "scope": 3, "action": 4, "rules": 5, "dry_run": 6, "extensions": 7}
    assert numbers(apb.Rule) == {"clauses": 1}
    assert numbers(apb.Clause) == {"matches": 2}
    assert numbers(apb.Match) == {
        "namespaces": 1, "not_namespaces": 2, "principals": 3, "not_principals": 4,
        "source_ips": 5, "not_source_ips": 6, "destination_ips": 7, "not_destination_ips": 8,
        "destination_ports": 9, "not_destination_ports": 10, "service_accounts": 11,
        "not_service_accounts": 12, "extensions": 13,
    }
    assert numbers(apb.Address) == {"address": 1, "length": 2}
    assert numbers(apb.ServiceAccountMatch) == {"namespace": 1, "serviceAccount": 2}
    assert numbers(apb.StringMatch) == {"exact": 1, "prefix": 2, "suffix": 3, "presence": 4}
    assert apb.StringMatch.DESCRIPTOR.fields_by_name["presence"].message_type.full_name == "google.protobuf.Empty"
    assert enum_values(apb.Scope) == {"GLOBAL": 0, "NAMESPACE": 1, "WORKLOAD_SELECTOR": 2}
    assert enum_values(apb.Action) == {"ALLOW": 0, "DENY": 1}
    # The extension message here has istio.workload.Extension's wire shape.
    assert numbers(apb.Extension) == numbers(wpb.Extension)


def test_authorization_encoding_uses_istio_numbers():
    p = apb.Authorization(name="n", action=apb.DENY, rules=[apb.Rule(clauses=[apb.Clause(
        matches=[apb.Match(destination_ports=[80])])])])
    # name=1 "n"; action=4 varint 1; rules=5 { clauses=1 { matches=2 { destination_ports=9 packed [80] } } }
    match = apb.Match(destination_ports=[80]).SerializeToString()
    assert match == b"\x4a\x01\x50"
    clause = apb.Clause(matches=[apb.Match(destination_ports=[80])]).SerializeToString()
    assert clause == b"\x12\x03" + match
    rule = apb.Rule(clauses=[apb.Clause(matches=[apb.Match(destination_ports=[80])])]).SerializeToString()
    assert rule == b"\x0a\x05" + clause
    assert p.SerializeToString() == b"\x0a\x01n" + b"\x20\x01" + b"\x2a\x07" + rule
