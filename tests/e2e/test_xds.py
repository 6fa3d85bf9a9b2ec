"""ztunnel-fast configured only over xDS by the fake istiod, end to end in network namespaces.

Topology: an `istiod` pod (not a workload) runs the fake istiod (fakes/istiod.py: xDS and CA on
one port, through demo.lab.LabIstiod) on 15012 with TLS for istiod.istio-system.svc chaining to
the CA's root; each mesh pod runs ztunnel-fast in dedicated mode with ztunnel's variables
(XDS_ADDRESS, CA_ADDRESS, one root for XDS_ROOT_CA and CA_ROOT_CA, ALT_*_HOSTNAME, AUTH_TOKEN,
POD_*, INSTANCE_IP) and no local config or local CA.  The fake's
config file has the local-config shape; rewriting it pushes deltas.  Both engines; payloads are
checked by sha256.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from ztunnel_fast.demo.lab import LabIstiod
from ztunnel_fast.state.dump import policy_json, service_json, workload_json
from ztunnel_fast.state.store import ProxyState
from ztunnel_fast.xds.local import parse_local_config

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
TOKEN = "e2e-bearer-token"
DENY_PORT_81 = {"name": "deny-81", "namespace": "demo", "scope": "Namespace", "action": "Deny",
                "rules": [[[{"destinationPorts": [81]}]]]}


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ready(lab, p) -> bool:
    return lab.http(p, "http://127.0.0.1:15021/healthz/ready")[0] == 200


def dump(lab, p) -> dict:
    status, body = lab.http(p, "http://127.0.0.1:15000/config_dump")
    assert status == 200
    return json.loads(body)


def assert_echo(out, size):
    assert out.get("ok"), out
    assert out["received"] == size and out["received_sha256"] == out["sent_sha256"]


def mesh_over_xds(lab):
    istiod = LabIstiod(lab, token=TOKEN)
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.service("httpbin", "demo", "198.19.0.10", {8000: 80}, [b])
    lab.write_config()  # the Lab's file exists but no ztunnel-fast reads it (LOCAL_XDS_PATH="")
    istiod.start()
    for port in (80, 81):
        lab.app(b, "serve", str(port), "echo", port=port)
    istiod.exempt(a)
    za = lab.start_ztunnel(a, **istiod.env(a, XDS_HEADER_X_TEST_RUN="e2e"))
    zb = lab.start_ztunnel(b, redirect=False, **istiod.env(b, XDS_HEADER_X_TEST_RUN="e2e"))
    for p in (a, b):
        wait_for(lambda p=p: ready(lab, p), what=f"{p.name} ready after the xDS sync")
    return istiod, a, b, za, zb


def test_workloads_only_from_xds_carry_hbone_and_a_pushed_policy_denies_new_connections(lab):
    istiod, a, b, za, zb = mesh_over_xds(lab)
    assert "local-config.yaml" not in za.log()

    # HBONE through the service VIP, with workloads known only from xDS
    assert_echo(lab.client(a, "echo", "198.19.0.10", "8000", "--size", str(64 * MiB)), 64 * MiB)
    assert za.lines(f"proxy to {b.ip}:80 using HBONE")

    # what istiod saw: token, clusterid, extra header, node id and metadata, ACKs for both types
    reqs = istiod.requests()
    opening = [r for r in reqs if not r["nonce"] and r["node"] and r["node"]["id"].startswith(f"ztunnel~{a.ip}~")]
    assert {r["typeUrl"] for r in opening} == {"type.googleapis.com/istio.workload.Address",
                                               "type.googleapis.com/istio.security.Authorization"}
    first = opening[0]
    assert first["node"]["id"] == f"ztunnel~{a.ip}~ztunnel-sleep.istio-system~istio-system.svc.cluster.local"
    assert first["node"]["metadata"]["NAME"] == "ztunnel-sleep" and first["node"]["metadata"]["NODE_NAME"] == "node1"
    assert first["node"]["metadata"]["CLUSTER_ID"] == "Kubernetes"
    assert first["metadata"]["authorization"] == f"Bearer {TOKEN}.{a.name}"
    # its certificate: istiod's CA, same token, its own service account (dedicated: no impersonation)
    assert any(r["metadata"]["authorization"] == f"Bearer {TOKEN}.{a.name}" and r["impersonated"] is None
               and r["issued"] == a.identity and r["status"] == "OK" for r in istiod.ca_requests())
    assert first["metadata"]["clusterid"] == "Kubernetes" and first["metadata"]["x_test_run"] == "e2e"
    assert all(r["nack"] is None for r in reqs)

    # config_dump shows xDS-delivered objects exactly as the local file would
    local = parse_local_config(yaml.safe_dump(lab.config()), "expected")
    expected_state = ProxyState.from_local(local)
    d = dump(lab, a)
    assert sorted(d["workloads"], key=lambda w: w["uid"]) == sorted(
        (workload_json(w) for w in local.workloads), key=lambda w: w["uid"])
    assert d["services"] == [service_json(s, expected_state) for s in local.services]

    # an allowed transfer in flight, a connection to port 81 held open, then the deny is pushed
    transfer, transfer_out = lab.client_background(a, "echo", b.ip, "80", "--size", str(32 * MiB),
                                                   "--chunk-delay", "0.05")
    held, held_out = lab.client_background(a, "hold", b.ip, "81", "--seconds", "60")
    wait_for(lambda: "established" in held_out.read_text(), what="held connection")
    istiod.policies = [DENY_PORT_81]
    istiod.write()
    held.wait(timeout=30)
    assert transfer.poll() is None, "the transfer ended before the policy arrived: no overlap to test"
    assert json.loads(held_out.read_text().strip().splitlines()[-1])["ended"] in ("reset", "eof")
    assert zb.lines("connection closed because it's no longer allowed after a policy update")
    denied = lab.client(a, "echo", b.ip, "81", "--size", "64")
    assert not denied["ok"] and denied.get("received", 0) == 0
    transfer.wait(timeout=120)
    assert_echo(json.loads(transfer_out.read_text().strip().splitlines()[-1]), 32 * MiB)
    assert [p["name"] for p in dump(lab, b)["policies"]] == ["deny-81"]
    assert dump(lab, b)["policies"] == [policy_json(p) for p in
                                        parse_local_config(yaml.safe_dump({"policies": [DENY_PORT_81]}), "x").policies]


def test_removal_nack_and_istiod_restart_keep_serving(lab):
    istiod, a, b, za, zb = mesh_over_xds(lab)
    assert_echo(lab.client(a, "echo", b.ip, "80", "--size", str(MiB)), MiB)

    # a malformed resource: NACKed with its name and reason; the process keeps serving
    istiod.malformed = [{"typeUrl": "type.googleapis.com/istio.workload.Address", "name": "bad-one", "hex": "ffff"}]
    istiod.write()
    # both proxies get the push: wait for the NACK of each (by its stream's bearer token), since
    # one proxy's NACK says nothing about whether the other has handled the push yet
    callers = {f"Bearer {istiod.token_of(p)}": z for p, z in ((a, za), (b, zb))}

    def nacks_from_each_proxy():
        nacks = [r for r in istiod.requests() if r["nack"]]
        return nacks if {r["metadata"]["authorization"] for r in nacks} == set(callers) else None

    nacks = wait_for(nacks_from_each_proxy, what="a NACK from each proxy")
    assert all(n["nack"].startswith("bad-one: cannot decode istio.workload.Address") for n in nacks)
    for z in callers.values():  # each logs the NACK before sending it
        assert z.lines("type=NACK error=bad-one: cannot decode istio.workload.Address")
    assert ready(lab, a) and ready(lab, b)
    assert_echo(lab.client(a, "echo", b.ip, "80", "--size", str(MiB)), MiB)

    # istiod goes away: state is kept, traffic keeps flowing, the client says it is retrying
    istiod.malformed = []
    istiod.write()
    istiod.stop()
    wait_for(lambda: za.lines("XDS client connection error"), what="retry log line")
    assert_echo(lab.client(a, "echo", "198.19.0.10", "8000", "--size", str(MiB)), MiB)
    assert ready(lab, a)

    # istiod back: the new stream announces what is held, and a removal while away is applied
    sleep_uid = "Kubernetes//Pod/demo/sleep"
    httpbin_uid = "Kubernetes//Pod/demo/httpbin"
    removed_pod, removed_services = lab.pods.pop("httpbin"), list(lab.services)
    lab.services.clear()
    istiod.write()
    before = len(istiod.requests())
    istiod.start()
    wait_for(lambda: httpbin_uid not in {w["uid"] for w in dump(lab, a)["workloads"]}, what="removal after restart")
    reopened = [r for r in istiod.requests()[before:] if r["initialResourceVersions"]]
    assert any(httpbin_uid in r["initialResourceVersions"] and sleep_uid in r["initialResourceVersions"]
               for r in reopened)
    assert dump(lab, a)["services"] == []
    # httpbin's own ztunnel-fast forgot the certificate of its removed workload
    wait_for(lambda: dump(lab, b)["certificates"] == [], what="certificate forgotten")
    # httpbin is now unknown to sleep's ztunnel-fast: plain passthrough, no HBONE
    assert_echo(lab.client(a, "echo", b.ip, "80", "--size", "1024"), 1024)
    assert za.lines(f"proxy to {b.ip}:80 using TCP via {b.ip}:80 type Passthrough")

    # added back live: routing changes to HBONE through the VIP again
    hbone_before = len(za.lines(f"proxy to {b.ip}:80 using HBONE"))
    lab.pods["httpbin"] = removed_pod
    lab.services.extend(removed_services)
    istiod.write()
    wait_for(lambda: dump(lab, a)["services"], what="service back")
    wait_for(lambda: [c for c in dump(lab, b)["certificates"] if c["state"] == "Available"], what="certificate back")
    assert_echo(lab.client(a, "echo", "198.19.0.10", "8000", "--size", str(MiB)), MiB)
    assert len(za.lines(f"proxy to {b.ip}:80 using HBONE")) == hbone_before + 1
    assert not za.lines(f"dst.addr={istiod.pod.ip}:15012")  # istiod's stream never went through the proxy
    assert not [line for line in za.log().splitlines() if "chttp2" in line]  # gRPC's own log lines stay quiet
    status, body = lab.http(a, "http://127.0.0.1:15020/metrics")
    assert 'istio_xds_connection_terminations_total{reason="ConnectionError"}' in body
    assert 'istio_xds_message_total{url="type.googleapis.com/istio.workload.Address"}' in body


def test_istiod_unreachable_at_start_is_not_fatal(lab):
    """ztunnel-fast starts before istiod: it listens, stays not ready with `state manager` pending,
    logs each attempt, and becomes ready once istiod answers."""
    istiod = LabIstiod(lab, token=TOKEN)
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    istiod.write()
    lab.app(b, "serve", "80", "echo", port=80)
    zb = lab.start_ztunnel(b, redirect=False, **istiod.env(b, XDS_HEADER_X_TEST_RUN="e2e"))  # "proxy ready" line: listeners are up
    wait_for(lambda: len(zb.lines("XDS client connection error")) >= 2, what="retries while istiod is down")
    status, body = lab.http(b, "http://127.0.0.1:15021/healthz/ready")
    assert status == 500 and '"state manager"' in body
    assert zb.proc.poll() is None
    istiod.start()
    wait_for(lambda: ready(lab, b), what="ready once istiod answers")
    assert {w["uid"] for w in dump(lab, b)["workloads"]} == {"Kubernetes//Pod/demo/sleep", "Kubernetes//Pod/demo/httpbin"}
    # the certificate of the workload xDS just delivered is fetched before any connection needs it
    certs = wait_for(lambda: [c for c in dump(lab, b)["certificates"] if c["state"] == "Available"],
                     what="prefetched certificate")
    assert [c["identity"] for c in certs] == ["spiffe://cluster.local/ns/demo/sa/httpbin"]
    istiod.exempt(a)
    lab.start_ztunnel(a, **istiod.env(a, XDS_HEADER_X_TEST_RUN="e2e"))
    wait_for(lambda: ready(lab, a), what="client side ready")
    assert_echo(lab.client(a, "echo", b.ip, "80", "--size", str(MiB)), MiB)
