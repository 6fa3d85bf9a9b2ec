"""The delta ADS core (xds/delta.py): messages in, changes and ACK/NACK out; no sockets."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2, json_format

from ztunnel_fast.protos import authorization_pb2 as apb
from ztunnel_fast.protos import discovery_pb2  # ztunnel's cut of Envoy's messages (test_protos.py: same wire)
from ztunnel_fast.protos import workload_pb2 as wpb
from ztunnel_fast.state.store import Removal, StateStore, XDS_SOURCE
from ztunnel_fast.xds import delta
from ztunnel_fast.xds.convert import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL


def packed(msg) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def wl(uid, ip=(10, 0, 0, 1), **kw):
    return discovery_pb2.Resource(name=uid, version="v1", resource=packed(wpb.Address(workload=wpb.Workload(
        uid=uid, name=uid, namespace="ns", addresses=[bytes(ip)], **kw))))


def policy(name, version="v1"):
    return discovery_pb2.Resource(name=f"ns/{name}", version=version, resource=packed(
        apb.Authorization(name=name, namespace="ns", scope=apb.NAMESPACE, action=apb.DENY)))


def response(type_url, resources=(), removed=(), nonce="n1"):
    return discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, resources=list(resources),
                                                removed_resources=list(removed), nonce=nonce)


@pytest.fixture
def session():
    return delta.DeltaSession(delta.build_node(instance_ip="10.1.0.5", pod_name="ztunnel-abc",
                                               pod_namespace="istio-system", node_name="node1"))


def test_node_id_and_metadata_as_ztunnel_builds_them():
    node = delta.build_node(instance_ip="10.1.0.5", pod_name="ztunnel-abc", pod_namespace="istio-system",
                            node_name="node1", proxy_metadata=(("CLUSTER_ID", "c1"), ("ENABLE_HBONE", "true"),
                                                               ("json:LABELS", '{"app": "z", "n": [1, 2]}')))
    assert node.id == "ztunnel~10.1.0.5~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    assert json_format.MessageToDict(node.metadata) == {
        "NAME": "ztunnel-abc", "NAMESPACE": "istio-system", "INSTANCE_IPS": "10.1.0.5", "NODE_NAME": "node1",
        "CLUSTER_ID": "c1", "ENABLE_HBONE": "true", "LABELS": {"app": "z", "n": [1.0, 2.0]}}
    assert delta.node_id("", "p", "ns") == "ztunnel~1.1.1.1~p.ns~ns.svc.cluster.local"
    # invalid JSON is left out (ztunnel logs it and carries on)
    node = delta.build_node(instance_ip="", pod_name="", pod_namespace="", node_name="",
                            proxy_metadata=(("json:BAD", "{nope"), ("json:GOOD", "true")))
    assert "BAD" not in node.metadata.fields and node.metadata.fields["GOOD"].bool_value is True


def test_initial_requests_subscribe_both_types_wildcard_with_node(session):
    reqs = session.initial_requests()
    assert [r.type_url for r in reqs] == ["type.googleapis.com/istio.workload.Address",
                                          "type.googleapis.com/istio.security.Authorization"]
    for r in reqs:
        assert r.node.id.startswith("ztunnel~10.1.0.5~")
        assert list(r.resource_names_subscribe) == [] and dict(r.initial_resource_versions) == {}
        assert not r.response_nonce and not r.HasField("error_detail")


def test_ack_applies_and_marks_synced(session):
    out = session.on_response(response(ADDRESS_TYPE_URL, [wl("a"), wl("b", (10, 0, 0, 2))], nonce="n7"))
    assert [w.uid for w in out.upserts] == ["a", "b"] and out.first and not out.nack
    assert out.reply == discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL, response_nonce="n7")
    assert not session.all_synced
    out = session.on_response(response(AUTHORIZATION_TYPE_URL, [policy("p")]))
    assert out.first and session.all_synced and out.upserts[0].key == "ns/p"
    again = session.on_response(response(AUTHORIZATION_TYPE_URL, [policy("p", "v2")], nonce="n9"))
    assert not again.first


def test_nack_names_each_rejected_resource_and_applies_the_rest(session):
    bad_ip = wl("bad-ip", (10, 0, 0))
    legacy = wl("legacy", tunnel_protocol=wpb.LEGACY_ISTIO_MTLS)
    garbage = discovery_pb2.Resource(name="junk", version="v1", resource=any_pb2.Any(
        type_url=ADDRESS_TYPE_URL, value=b"\xff\xff\xff"))
    wrong_type = discovery_pb2.Resource(name="ns/p", resource=packed(apb.Authorization(name="p")))
    out = session.on_response(response(ADDRESS_TYPE_URL, [wl("good"), bad_ip, legacy, garbage, wrong_type],
                                       nonce="n2"))
    assert [w.uid for w in out.upserts] == ["good"]
    assert out.nack and out.reply.response_nonce == "n2" and out.reply.type_url == ADDRESS_TYPE_URL
    assert out.reply.error_detail.code == 0  # ztunnel leaves the status code at its default
    message = out.reply.error_detail.message
    parts = message.split("; ")
    assert parts[0] == "bad-ip: workload.addresses[0]: invalid IP address: 3 bytes (expected 4 or 16)"
    assert parts[1] == "legacy: workload.tunnel_protocol: unsupported TunnelProtocol LEGACY_ISTIO_MTLS"
    assert parts[2].startswith("junk: cannot decode istio.workload.Address")
    assert parts[3] == ("ns/p: resource type 'type.googleapis.com/istio.security.Authorization' in a "
                        "type.googleapis.com/istio.workload.Address response")
    # every name istiod sent is known (announced on reconnect), accepted or not
    assert session.known[ADDRESS_TYPE_URL] == {"good", "bad-ip", "legacy", "junk", "ns/p"}
    # a NACKed first response does not count as synced (ready waits for an accepted one)
    assert not out.first and ADDRESS_TYPE_URL not in session.synced
    again = session.on_response(response(ADDRESS_TYPE_URL, [wl("good")], nonce="n3"))
    assert again.first and not again.nack and ADDRESS_TYPE_URL in session.synced


def test_rejected_update_keeps_the_previous_state(session):
    store = StateStore()
    out = session.on_response(response(ADDRESS_TYPE_URL, [wl("a")]))
    store.apply(XDS_SOURCE, out.upserts, out.removals)
    broken = wl("a", (1, 2, 3))
    broken.version = "v2"
    out = session.on_response(response(ADDRESS_TYPE_URL, [broken]))
    state = store.apply(XDS_SOURCE, out.upserts, out.removals)
    assert out.nack and state.workload_by_ip("10.0.0.1").uid == "a"


def test_known_names_feed_initial_resource_versions_on_reconnect(session):
    session.on_response(response(ADDRESS_TYPE_URL, [wl("a"), wl("b", (10, 0, 0, 2))]))
    session.on_response(response(AUTHORIZATION_TYPE_URL, [policy("p", "7")]))
    out = session.on_response(response(ADDRESS_TYPE_URL, removed=["b"]))
    assert out.removals == [Removal("address", "b")] and not out.nack
    out = session.on_response(response(AUTHORIZATION_TYPE_URL, removed=["ns/gone"]))
    assert out.removals == [Removal("policy", "ns/gone")]
    reqs = {r.type_url: r for r in session.initial_requests()}
    # names with empty versions, as ztunnel sends them
    assert dict(reqs[ADDRESS_TYPE_URL].initial_resource_versions) == {"a": ""}
    assert dict(reqs[AUTHORIZATION_TYPE_URL].initial_resource_versions) == {"ns/p": ""}
    assert reqs[ADDRESS_TYPE_URL].node.id == session.node.id


def test_unknown_type_url_is_nacked(session):
    out = session.on_response(response("type.googleapis.com/envoy.config.cluster.v3.Cluster", nonce="x"))
    assert out.nack and not out.changes
    assert out.reply.error_detail.message == "type.googleapis.com/envoy.config.cluster.v3.Cluster: type URL not subscribed"
    assert not session.synced


def test_backoff_sequence_cap_and_resets():
    b = delta.Backoff()
    delays = [b.next_delay("ConnectionError") for _ in range(13)]
    assert delays[:4] == [0.02, 0.04, 0.08, 0.16]
    assert delays[-1] == 15.0 and max(delays) == 15.0 and delays == sorted(delays)
    assert b.next_delay("Reconnect") == 0.01
    assert b.next_delay("Error") == 0.02
    assert b.next_delay("Complete") == 0.01


@pytest.mark.parametrize("code, details, connected, reason", [
    (None, "", True, "Complete"),
    (grpc.StatusCode.UNKNOWN, "", True, "Reconnect"),
    (grpc.StatusCode.CANCELLED, "", False, "Reconnect"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "", True, "Reconnect"),
    (grpc.StatusCode.UNAVAILABLE, "transport is closing", True, "Reconnect"),
    (grpc.StatusCode.UNAVAILABLE, "Received prior GOAWAY", True, "Reconnect"),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", False, "ConnectionError"),
    (grpc.StatusCode.UNAVAILABLE, "Socket closed", True, "Error"),
    (grpc.StatusCode.PERMISSION_DENIED, "no", False, "Error"),
])
def test_stream_end_classification(code, details, connected, reason):
    assert delta.classify(code, details, connected=connected) == reason
