"""The combined fake istiod (fakes/istiod.py): ztunnel-fast's own xDS client and CA client against
ONE port over TLS, both verifying it with the one root bundle the CA hands out; the config file
drives workloads (xDS) and callers (CA) together.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from ipaddress import ip_address

import pytest
import yaml
from cryptography import x509

from ztunnel_fast.config import IstiodEndpoint, parse_istiod_address
from ztunnel_fast.errors import IdentityError
from ztunnel_fast.fakes.ca_server import FakePki
from ztunnel_fast.fakes.istiod import ISTIOD_NAME, FakeIstiod, callers_from_knobs
from ztunnel_fast.identity.istiod_ca import IstiodCA
from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.state.store import XDS_SOURCE, StateStore
from ztunnel_fast.state.workload import TunnelProtocol, Workload
from ztunnel_fast.telemetry.metrics import Metrics
from ztunnel_fast.xds.client import XdsClient
from ztunnel_fast.xds.delta import DeltaSession, build_node

W1 = Identity("cluster.local", "demo", "s1")
WAIT = 20.0  # seconds: bound of waits, never a pass condition


def endpoint(port: int, root) -> IstiodEndpoint:
    return IstiodEndpoint(address=parse_istiod_address("XDS_ADDRESS", f"https://127.0.0.1:{port}"),
                          root_ca=str(root), server_name=ISTIOD_NAME)


def test_one_port_one_root_serves_xds_and_ca(tmp_path):
    async def body():
        pki = FakePki.create(tmp_path / "pki")
        istiod = FakeIstiod(pki)
        istiod.ca.callers = callers_from_knobs({"callers": [
            {"token": "tok", "serviceAccount": "istio-system/ztunnel", "identities": [str(W1)]}]})
        istiod.xds.set_state([Workload(uid="Kubernetes//Pod/demo/w1", name="w1", namespace="demo",
                                       service_account="s1", workload_ips=(ip_address("10.0.0.1"),),
                                       protocol=TunnelProtocol.HBONE)])
        (tmp_path / "token").write_text("tok\n")
        port = await istiod.start("127.0.0.1", 0)
        store, synced = StateStore(), asyncio.Event()
        node = build_node(instance_ip="10.1.0.5", pod_name="ztunnel-x1", pod_namespace="istio-system",
                          node_name="node1", proxy_metadata=(("CLUSTER_ID", "Kubernetes"),))
        client = XdsClient(endpoint(port, pki.root_path), DeltaSession(node), auth_token=str(tmp_path / "token"),
                           cluster_id="Kubernetes", apply=lambda u, r: store.apply(XDS_SOURCE, u, r),
                           metrics=Metrics(), on_synced=synced.set)
        task = asyncio.get_running_loop().create_task(client.run())
        ca = IstiodCA(endpoint(port, pki.root_path), auth_token=str(tmp_path / "token"), cluster_id="Kubernetes",
                      impersonate=True)
        try:
            await asyncio.wait_for(synced.wait(), WAIT)
            assert store.state.workload_by_ip("10.0.0.1").uid == "Kubernetes//Pod/demo/w1"
            issued = await ca.issue(W1, 3600)
            leaf = x509.load_pem_x509_certificate(issued.chain_pem[0])
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [str(W1)]
            # the workload certificate and istiod's serving certificate chain to the same root
            assert issued.root_pem == pki.root_bundle_pem
            serving = x509.load_pem_x509_certificates(pki.serving_chain_pem)
            assert serving[-1].issuer == pki.root.subject and serving[0].issuer == leaf.issuer
            assert [r.metadata["authorization"] for r in istiod.xds.received][:1] == ["Bearer tok"]
            assert istiod.ca.requests[-1].impersonated == str(W1) and istiod.ca.requests[-1].status == "OK"
            # a caller the fake does not know is refused as istiod refuses it
            istiod.ca.callers = {}
            with pytest.raises(IdentityError, match="request authenticate failure"):
                await ca.issue(W1, 3600)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ca.close()
            await istiod.stop(0)

    asyncio.run(asyncio.wait_for(body(), 60))


def test_cli_config_file_drives_both_sides(tmp_path):
    """The standalone fake: the file's callers reach the CA before the "config" line; a bad
    callers entry is a config-error line, and the process keeps serving."""
    config = tmp_path / "istiod.yaml"
    doc = {"workloads": [{"uid": "Kubernetes//Pod/demo/w1", "name": "w1", "namespace": "demo",
                          "serviceAccount": "s1", "workloadIps": ["10.0.0.1"], "protocol": "HBONE"}],
           "callers": [{"token": "tok", "serviceAccount": "istio-system/ztunnel", "identities": [str(W1)]}]}
    config.write_text(yaml.safe_dump(doc))
    record = tmp_path / "ca.jsonl"
    out = open(tmp_path / "out.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ztunnel_fast.fakes.istiod", "--pki", str(tmp_path / "pki"),
                             "--listen", "127.0.0.1:0", "--config", str(config), "--record", str(record),
                             "--caller", "fixed,demo/other"], stdout=out, stderr=subprocess.STDOUT)
    out.close()

    def events():
        return [json.loads(line) for line in (tmp_path / "out.log").read_text().splitlines() if line.startswith("{")]

    def wait(pred, what):
        deadline = time.monotonic() + WAIT
        while not pred():
            assert proc.poll() is None, (tmp_path / "out.log").read_text()
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    try:
        wait(lambda: any(e["event"] == "config" for e in events()), "config loaded")
        port = int(next(e for e in events() if e["event"] == "listening")["address"].rsplit(":", 1)[1])
        (tmp_path / "token").write_text("tok\n")

        async def issue(token: str, identity: Identity, impersonate: bool):
            (tmp_path / "token").write_text(token + "\n")
            ca = IstiodCA(endpoint(port, tmp_path / "pki" / "root-cert.pem"), auth_token=str(tmp_path / "token"),
                          cluster_id="Kubernetes", impersonate=impersonate)
            try:
                return await ca.issue(identity, 3600)
            finally:
                await ca.close()

        assert asyncio.run(issue("tok", W1, True)).identity == W1
        assert asyncio.run(issue("fixed", Identity("cluster.local", "demo", "other"), False))
        config.write_text(yaml.safe_dump({**doc, "callers": [{"token": "", "serviceAccount": "x"}]}))
        wait(lambda: any(e["event"] == "config-error" for e in events()), "config-error reported")
        config.write_text(yaml.safe_dump({**doc, "callers": []}))
        wait(lambda: sum(e["event"] == "config" for e in events()) == 2, "second config")
        with pytest.raises(IdentityError, match="request authenticate failure"):
            asyncio.run(issue("tok", W1, True))
        assert asyncio.run(issue("fixed", Identity("cluster.local", "demo", "other"), False))  # --caller stays
        statuses = [json.loads(line)["status"] for line in record.read_text().splitlines()]
        assert statuses == ["OK", "OK", "UNAUTHENTICATED", "OK"]
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
