"""CONNECT request/response rules of HBONE, without sockets."""

from ipaddress import ip_address

import pytest

from ztunnel_fast.hbone import headers as H
from ztunnel_fast.state.workload import Locality, Workload

SELF = {15001, 15006, 15008}
POD = ip_address("198.18.0.2")


def test_request_carries_only_method_and_authority_pseudo_headers():
    src = Workload(uid="u", name="sleep-1", namespace="demo", workload_name="sleep", canonical_name="sleep",
                   canonical_revision="v1", locality=Locality("r1", "z1"))
    req = H.connect_request("198.18.0.2:80", client_ip="198.18.0.1", client_port=4242, trace_id="a" * 32,
                            source=src, service_host="httpbin.demo.svc.cluster.local")
    d = dict(req)
    assert [k for k, _ in req if k.startswith(":")] == [":method", ":authority"]
    assert d[":method"] == "CONNECT" and d[":authority"] == "198.18.0.2:80"
    assert d["forwarded"] == 'for="198.18.0.1:4242";host=httpbin.demo.svc.cluster.local'
    assert d["traceparent"].startswith("00-" + "a" * 32 + "-") and d["traceparent"].endswith("-00")
    bag = H.parse_baggage(d["baggage"])
    assert bag == {
        "k8s.cluster.name": "Kubernetes", "k8s.namespace.name": "demo", "k8s.deployment.name": "sleep",
        "service.name": "sleep", "service.version": "v1", "cloud.region": "r1", "cloud.availability_zone": "z1",
    }


def test_forwarded_without_service_and_ipv6_brackets():
    assert H.forwarded("fd00::1", 80) == 'for="[fd00::1]:80"'
    assert H.format_addr(ip_address("fd00::1"), 15008) == "[fd00::1]:15008"


@pytest.mark.parametrize("authority,expected", [
    ("198.18.0.2:80", (ip_address("198.18.0.2"), 80)),
    ("[fd00::2]:8080", (ip_address("fd00::2"), 8080)),
])
def test_parse_authority_accepts_ip_port(authority, expected):
    assert H.parse_authority(authority) == expected


@pytest.mark.parametrize("authority", [
    "", "198.18.0.2", "198.18.0.2:", ":80", "198.18.0.2:0", "198.18.0.2:65536", "198.18.0.2:http",
    "example.com:80", "fd00::2:80", "[198.18.0.2]:80", "198.18.0.256:80", "198.18.0.2:80:1",
])
def test_parse_authority_refuses_malformed(authority):
    with pytest.raises(ValueError):
        H.parse_authority(authority)


@pytest.mark.parametrize("headers,status,reason", [
    ([(":method", "GET"), (":authority", "198.18.0.2:80"), (":scheme", "https"), (":path", "/")], 400, "expected method CONNECT"),
    ([(":method", "CONNECT"), (":authority", "nonsense")], 400, "no valid authority"),
    ([(":method", "CONNECT")], 400, "no valid authority"),
    ([(":method", "CONNECT"), (":authority", "198.18.0.9:80")], 400, "ip mismatch"),
    ([(":method", "CONNECT"), (":authority", "198.18.0.2:15008")], 503, "self call"),
    ([(":method", "CONNECT"), (":authority", "198.18.0.2:15001")], 503, "self call"),
    ([(":method", "CONNECT"), (":authority", "198.18.0.2:15006")], 503, "self call"),
])
def test_check_connect_refusals(headers, status, reason):
    result = H.check_connect(headers, arrived_on=POD, self_ports=SELF)
    assert isinstance(result, H.Refusal)
    assert result.status == status and reason in result.reason


def test_check_connect_accepts_and_extracts_trace_id():
    tp = H.traceparent("b" * 32)
    result = H.check_connect({":method": "CONNECT", ":authority": "198.18.0.2:80", "traceparent": tp},
                             arrived_on=POD, self_ports=SELF)
    assert result == H.ConnectTarget(POD, 80, "b" * 32)


def test_check_connect_without_arrival_ip_skips_mismatch_check():
    result = H.check_connect([(":method", "CONNECT"), (":authority", "198.18.0.9:80")], arrived_on=None, self_ports=SELF)
    assert isinstance(result, H.ConnectTarget) and result.trace_id is None


@pytest.mark.parametrize("value", [None, "", "00-xyz-abc-00", "00-" + "g" * 32 + "-" + "0" * 16 + "-00"])
def test_trace_id_of_malformed(value):
    assert H.trace_id_of(value) is None


def test_new_trace_ids_are_random_hex():
    ids = {H.new_trace_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_status_text():
    assert H.status_text(401) == "401 Unauthorized"
    assert H.status_text(400) == "400 Bad Request"


def test_check_connect_allows_another_ip_only_when_may_differ_says_so():
    req = {":method": "CONNECT", ":authority": "198.19.0.10:8000"}
    assert isinstance(H.check_connect(req, arrived_on=POD, self_ports=SELF, may_differ=lambda ip: False), H.Refusal)
    ok = H.check_connect(req, arrived_on=POD, self_ports=SELF, may_differ=lambda ip: str(ip) == "198.19.0.10")
    assert not isinstance(ok, H.Refusal) and (str(ok.ip), ok.port) == ("198.19.0.10", 8000)
    # own ports stay refused for a waypoint too
    bad = H.check_connect({":method": "CONNECT", ":authority": "198.19.0.10:15008"}, arrived_on=POD,
                          self_ports=SELF, may_differ=lambda ip: True)
    assert isinstance(bad, H.Refusal) and bad.status == 503
