"""Certificates from istiod, end to end: two ztunnel-fast instances with no local CA.

The fake istiod CA (fakes/ca_server.py) runs in its own "istiod" network namespace on port 15012
over TLS (serving name istiod.istio-system.svc).  "node1" runs a shared-mode ztunnel-fast for its
workloads w1 (allowed to be impersonated) and w2 (not: no pod of it "on the node" per the CA's
allow-list); "sleep" runs a dedicated-mode ztunnel-fast with its own token.  Workloads come from
the local config file; certificates only from CA_ADDRESS.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest
from cryptography import x509
from OpenSSL import crypto

from ztunnel_fast import netns
from ztunnel_fast.fakes.ca_server import ISTIOD_NAME, FakePki

pytestmark = pytest.mark.e2e

ISTIOD_IP, NODE_IP, W1, W2, SLEEP_IP = "198.18.0.5", "198.18.0.10", "198.18.0.11", "198.18.0.12", "198.18.0.20"
W1_ID = "spiffe://cluster.local/ns/demo/sa/s1"
W2_ID = "spiffe://cluster.local/ns/demo/sa/s2"
SLEEP_ID = "spiffe://cluster.local/ns/demo/sa/sleep"
WAIT = 60.0  # seconds: bound of every wait loop (never a pass condition)


class IstiodCa:
    """The fake CA process in the istiod namespace; stop() and start() simulate an outage."""

    def __init__(self, lab, pod, pki_dir, record):
        self.lab, self.pod, self.pki_dir, self.record = lab, pod, pki_dir, record
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.lab.workdir / f"istiod-ca-{self.starts}.log"
        out = open(log, "wb")
        self.proc = self.lab.topology.popen(self.pod.pod, [
            sys.executable, "-m", "ztunnel_fast.fakes.ca_server", "--pki", str(self.pki_dir),
            "--listen", "0.0.0.0:15012", "--record", str(self.record),
            "--caller", f"tok-node1,istio-system/ztunnel,{W1_ID}",
            "--caller", "tok-sleep,demo/sleep",
        ], stdout=out, stderr=subprocess.STDOUT)
        out.close()
        wait(lambda: "listening on" in log.read_text(), f"fake CA not listening:\n{log.read_text()}",
             proc=self.proc)

    def stop(self) -> None:
        self.lab.topology.stop(self.proc)

    def requests(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]


def wait(cond, what: str, proc=None, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode}: {what}")
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def config_dump(lab, pod) -> dict:
    status, body = lab.http(pod, "http://localhost:15000/config_dump")
    assert status == 200, body
    return json.loads(body)


def certificate(dump: dict, identity: str) -> dict:
    (entry,) = [c for c in dump["certificates"] if c["identity"] == identity]
    return entry


def pem_of(entry: dict) -> bytes:
    return base64.b64decode(entry["pem"])  # config_dump carries the PEM base64-encoded, as ztunnel


def chains_to_istiod(pki: FakePki, entry: dict) -> bool:
    chain = [x509.load_pem_x509_certificate(pem_of(c)) for c in entry["certChain"]]
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(pki.root))
    ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(chain[0]),
                                  [crypto.X509.from_cryptography(c) for c in chain[1:]])
    ctx.verify_certificate()  # raises when the chain does not lead to the fake istiod's root
    return True


@pytest.fixture
def mesh(lab):
    istiod = lab.pod("istiod", namespace="istio-system", ip=ISTIOD_IP, workload=False)
    node = lab.pod("node1", node="node1", ip=NODE_IP, workload=False)
    w1 = lab.node_workload(node, "w1", W1, namespace="demo", service_account="s1")
    lab.node_workload(node, "w2", W2, namespace="demo", service_account="s2")
    sleep = lab.pod("sleep", namespace="demo", service_account="sleep", node="node2", ip=SLEEP_IP)
    lab.write_config()
    pki = FakePki.create(lab.workdir / "istiod-pki")
    ca = IstiodCa(lab, istiod, pki.directory, lab.workdir / "ca-requests.jsonl")
    ca.start()
    lab.app(node, "serve", "80", "echo", port=80)
    for name in ("node1", "sleep"):
        (lab.workdir / f"token-{name}").write_text(f"tok-{name}\n")

    def istiod_env(name: str) -> dict[str, str]:
        return {
            "LOCAL_CA_DIR": "",  # no local CA: certificates come from istiod only
            "CA_ADDRESS": f"{ISTIOD_IP}:15012",  # no scheme, as the chart sets it
            "CA_ROOT_CA": str(pki.root_path),
            "ALT_CA_HOSTNAME": ISTIOD_NAME,
            "AUTH_TOKEN": str(lab.workdir / f"token-{name}"),
            "CA_HEADER_TENANT": "e2e",
            "SECRET_TTL": "20s",
        }

    # as in a cluster, ztunnel's own connections to istiod are not captured: exempt them from the
    # pod's outbound redirect (start_ztunnel appends the REDIRECT after this rule); otherwise every
    # CA request after start-up loops through the proxy itself (node1 is no workload: reset)
    for p in (sleep, node):
        netns.iptables(p.pod, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", ISTIOD_IP,
                       "--dport", "15012", "-j", "RETURN")
    zs = lab.start_ztunnel(sleep, **istiod_env("sleep"))
    zn = lab.start_ztunnel(node, shared=True, ENABLE_ORIG_SRC="false", **istiod_env("node1"))
    return pki, ca, node, w1, sleep, zs, zn


def test_hbone_with_istiod_certificates_survives_a_ca_outage(lab, mesh):
    pki, ca, node, w1, sleep, zs, zn = mesh

    # -- istiod's answers have reached both proxies (the CA records a request before it answers)
    def answered() -> bool:
        mine = {c["identity"]: c["state"] for c in config_dump(lab, sleep)["certificates"]}
        node_certs = {c["identity"]: c["state"] for c in config_dump(lab, node)["certificates"]}
        return (mine.get(SLEEP_ID) == "Available" and node_certs.get(W1_ID) == "Available"
                and "UNAUTHENTICATED" in node_certs.get(W2_ID, ""))

    wait(answered, "certificates of sleep and w1 issued, w2's refused")

    # -- what the CA saw: token, clusterid, extra header; impersonation only from the shared node
    by_caller: dict[str, list[dict]] = {}
    for req in ca.requests():
        by_caller.setdefault(req["metadata"]["authorization"], []).append(req)
    sleep_reqs, node_reqs = by_caller["Bearer tok-sleep"], by_caller["Bearer tok-node1"]
    assert all(r["impersonated"] is None and r["issued"] == SLEEP_ID for r in sleep_reqs)
    assert {r["impersonated"] for r in node_reqs} == {W1_ID, W2_ID}
    for r in sleep_reqs + node_reqs:
        assert r["metadata"]["clusterid"] == "Kubernetes" and r["metadata"]["tenant"] == "e2e"
        assert r["validity_duration"] == 20 and r["csr_key"] == "EC secp256r1"
        assert r["csr_sans"] == [r["impersonated"] or SLEEP_ID]
    assert {r["status"] for r in node_reqs if r["impersonated"] == W2_ID} == {"UNAUTHENTICATED"}

    # -- config_dump shows istiod's chain (leaf + intermediate) and both roots, serial in decimal
    dump = config_dump(lab, sleep)
    entry = certificate(dump, SLEEP_ID)
    assert entry["state"] == "Available"
    assert len(entry["certChain"]) == 2 and len(entry["rootCerts"]) == 2
    leaf = x509.load_pem_x509_certificate(pem_of(entry["certChain"][0]))
    assert entry["certChain"][0]["serialNumber"] == str(leaf.serial_number)
    assert [x509.load_pem_x509_certificate(pem_of(r)) for r in entry["rootCerts"]] == [pki.root, pki.other_root]
    assert chains_to_istiod(pki, entry)
    node_dump = config_dump(lab, node)
    assert chains_to_istiod(pki, certificate(node_dump, W1_ID))
    w2_state = certificate(node_dump, W2_ID)["state"]
    assert "UNAUTHENTICATED: request impersonation authentication failure" in w2_state
    # as in ztunnel, one identity istiod refuses does not hold the node's readiness: the node keeps
    # serving its other workloads and keeps retrying the refused one (shown Unavailable above)
    assert lab.http(node, "http://localhost:15021/healthz/ready")[0] == 200
    assert lab.http(sleep, "http://localhost:15021/healthz/ready")[0] == 200

    table = lab.topology.run(sleep.pod, [sys.executable, "-m", "ztunnel_fast", "proxy-config", "secrets"]).stdout
    # the secrets table prints serials as istioctl does (%x of the decimal config_dump value)
    assert format(leaf.serial_number, "x") in table and SLEEP_ID in table

    # -- HBONE between the two instances, each verifying the other against istiod's roots
    out = lab.client(sleep, "echo", w1.ip, "80", "--size", str(1 << 20))
    assert out["ok"], out
    assert any(f"peer_id={SLEEP_ID}" in line for line in zn.lines("got CONNECT request")), zn.log()

    # -- istiod goes away while a paced transfer is in flight; renewal fails, then recovers
    proc, out_path = lab.client_background(sleep, "echo", w1.ip, "80", "--size", str(16 << 20),
                                           "--chunk-delay", "0.4")
    wait(lambda: zn.lines(f"got CONNECT request to {w1.ip}:80") and len(zn.lines("got CONNECT request")) >= 2,
         "second tunnel established")
    ca.stop()
    wait(lambda: zs.lines("failed to fetch certificate"), "a renewal failed during the outage")
    assert proc.poll() is None  # the tunnel is still moving bytes
    assert certificate(config_dump(lab, sleep), SLEEP_ID)["state"] == "Available"  # old cert still served
    ca.start()
    wait(lambda: certificate(config_dump(lab, sleep), SLEEP_ID)["certChain"][0]["serialNumber"]
         != str(leaf.serial_number), "renewed certificate after the CA came back")
    assert proc.poll() is None  # renewal happened while the transfer was still in flight
    assert proc.wait(120) == 0
    result = json.loads(out_path.read_text().strip().splitlines()[-1])
    assert result["ok"], result  # hash-checked both ways across the outage and the renewal

    # new connections use the renewed certificate
    assert lab.client(sleep, "echo", w1.ip, "80", "--size", str(1 << 20))["ok"]
    renewed = certificate(config_dump(lab, sleep), SLEEP_ID)
    assert renewed["state"] == "Available" and chains_to_istiod(pki, renewed)
    for z in (zs, zn):  # the CA connections never went through the proxies
        assert not z.lines(f"dst.addr={ISTIOD_IP}:15012"), z.log()
