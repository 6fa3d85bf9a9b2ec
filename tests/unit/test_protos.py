"""The committed generated code matches the .proto files (regenerated into a temp dir and diffed)."""

import re
from pathlib import Path

from ztunnel_fast.protos import generate


def test_generated_code_is_current(tmp_path: Path):
    protos = generate.proto_files()
    assert protos, "no .proto files found"
    written = generate.generate(tmp_path)
    committed = sorted(generate.HERE.glob("*_pb2*.py"))
    assert [p.name for p in written] == [p.name for p in committed]
    for fresh in written:
        assert fresh.read_text() == (generate.HERE / fresh.name).read_text(), (
            f"{fresh.name} is stale: run python -m ztunnel_fast.protos.generate")


def test_ca_service_wire_names_and_field_numbers():
    """istiod routes by these names and numbers: a rename or renumbering breaks CreateCertificate."""
    from google.protobuf import descriptor_pb2

    from ztunnel_fast.protos import ca_pb2, ca_pb2_grpc

    service = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
    assert service.full_name == "istio.v1.auth.IstioCertificateService"
    method = service.methods_by_name["CreateCertificate"]
    assert f"/{service.full_name}/{method.name}" == "/istio.v1.auth.IstioCertificateService/CreateCertificate"
    assert method.input_type.full_name == "istio.v1.auth.IstioCertificateRequest"
    assert method.output_type.full_name == "istio.v1.auth.IstioCertificateResponse"
    assert not method.client_streaming and not method.server_streaming

    request = ca_pb2.IstioCertificateRequest.DESCRIPTOR
    fields = {f.name: (f.number, f.type, f.is_repeated) for f in request.fields}
    F = descriptor_pb2.FieldDescriptorProto
    assert fields == {
        "csr": (1, F.TYPE_STRING, False),
        "validity_duration": (3, F.TYPE_INT64, False),
        "metadata": (4, F.TYPE_MESSAGE, False),
    }
    assert request.fields_by_name["metadata"].message_type.full_name == "google.protobuf.Struct"
    proto = descriptor_pb2.DescriptorProto()
    request.CopyToProto(proto)
    assert [(r.start, r.end) for r in proto.reserved_range] == [(2, 3)]  # number 2 stays unused

    response = ca_pb2.IstioCertificateResponse.DESCRIPTOR
    assert [(f.name, f.number, f.type, f.is_repeated) for f in response.fields] == [
        ("cert_chain", 1, F.TYPE_STRING, True)]

    # The generated stub calls the same path (what a server registered from the protos answers).
    class RecordingChannel:
        def __init__(self):
            self.paths = []

        def unary_unary(self, path, **_):
            self.paths.append(path)
            return None

    channel = RecordingChannel()
    ca_pb2_grpc.IstioCertificateServiceStub(channel)
    assert channel.paths == ["/istio.v1.auth.IstioCertificateService/CreateCertificate"]
    assert hasattr(ca_pb2_grpc, "add_IstioCertificateServiceServicer_to_server")


def test_generated_stubs_import_their_messages_relatively():
    for stub in generate.HERE.glob("*_pb2_grpc.py"):
        text = stub.read_text()
        assert not re.search(r"^import \w+_pb2\b", text, re.MULTILINE), f"{stub.name}: top-level import"
        assert "from . import" in text, f"{stub.name}: message module import is not package-relative"


def _fields(descriptor) -> dict:
    return {f.name: (f.number, f.type, f.is_repeated,
                     f.message_type.name if f.message_type else None) for f in descriptor.fields}


def test_discovery_messages_are_envoys_on_the_wire():
    """protos/discovery.proto keeps a subset of Envoy's fields with Envoy's numbers and types, and
    bytes cross between it and xds-protos' full messages both ways."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2 as envoy
    from google.protobuf import any_pb2, json_format
    from google.rpc import status_pb2

    from ztunnel_fast.protos import discovery_pb2 as ours

    for mine, theirs in ((ours.Node, base_pb2.Node), (ours.Status, status_pb2.Status), (ours.Resource, envoy.Resource),
                         (ours.DeltaDiscoveryRequest, envoy.DeltaDiscoveryRequest),
                         (ours.DeltaDiscoveryResponse, envoy.DeltaDiscoveryResponse)):
        kept, full = _fields(mine.DESCRIPTOR), _fields(theirs.DESCRIPTOR)
        assert kept and {name: full.get(name) for name in kept} == kept, mine.DESCRIPTOR.name

    node = ours.Node(id="ztunnel~10.0.0.1~p.ns~ns.svc.cluster.local", cluster="c1")
    node.metadata.update({"NAME": "p", "LIST": [1, "x"]})
    request = ours.DeltaDiscoveryRequest(node=node, type_url="t", resource_names_subscribe=["a"],
                                         initial_resource_versions={"n": ""}, response_nonce="r",
                                         error_detail=ours.Status(code=3, message="bad"))
    parsed = envoy.DeltaDiscoveryRequest.FromString(request.SerializeToString())
    assert json_format.MessageToDict(parsed) == json_format.MessageToDict(request)
    assert parsed.node.metadata.fields["LIST"].list_value.values[1].string_value == "x"

    payload = any_pb2.Any(type_url="type.googleapis.com/x", value=b"\x0a\x01y")
    response = envoy.DeltaDiscoveryResponse(
        system_version_info="v", type_url="t", nonce="n1", removed_resources=["gone"],
        resources=[envoy.Resource(name="a", version="1", aliases=["b"], resource=payload)])
    response.control_plane.identifier = "istiod-1"  # a field ours leaves out: skipped, not misread
    mine = ours.DeltaDiscoveryResponse.FromString(response.SerializeToString())
    assert (mine.system_version_info, mine.type_url, mine.nonce, list(mine.removed_resources)) == ("v", "t", "n1", ["gone"])
    assert [(r.name, r.version, list(r.aliases), r.resource) for r in mine.resources] == [("a", "1", ["b"], payload)]
    assert envoy.DeltaDiscoveryResponse.FromString(mine.SerializeToString()) == response  # unknown fields kept
