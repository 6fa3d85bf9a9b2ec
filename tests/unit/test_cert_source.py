"""Choosing the certificate source as ztunnel does, and following local workloads (no sockets)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import uvloop

from ztunnel_fast.app import App, certificate_source
from ztunnel_fast.config import Config
from ztunnel_fast.errors import ConfigError
from ztunnel_fast.identity.ca import LocalCA, init_ca
from ztunnel_fast.identity.istiod_ca import IstiodCA
from ztunnel_fast.identity.manager import CertificateManager
from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.state.workload import TunnelProtocol

BASE = {"PROXY_MODE": "shared"}


def test_local_ca_dir_wins_over_ca_address(tmp_path):
    init_ca(tmp_path / "ca")
    cfg = Config.from_env({**BASE, "LOCAL_CA_DIR": str(tmp_path / "ca"), "CA_ADDRESS": "istiod:15012"})
    assert isinstance(certificate_source(cfg), LocalCA)


@pytest.mark.parametrize("mode, impersonate", [("shared", True), ("dedicated", False)])
def test_ca_address_selects_istiod_and_impersonates_only_in_shared_mode(mode, impersonate):
    env = {"PROXY_MODE": mode, "PROXY_WORKLOAD_INFO": "ns/pod/sa", "CA_ADDRESS": "istiod.istio-system.svc:15012",
           "CLUSTER_ID": "c1", "AUTH_TOKEN": "jwt"}
    source = certificate_source(Config.from_env(env))
    assert isinstance(source, IstiodCA)
    assert source.endpoint.address == "https://istiod.istio-system.svc:15012"
    assert source._impersonate is impersonate and source._cluster_id == "c1" and source._auth_token == "jwt"


def test_in_cluster_default_is_istiod():
    source = certificate_source(Config.from_env({**BASE, "KUBERNETES_SERVICE_HOST": "10.96.0.1"}))
    assert isinstance(source, IstiodCA) and source.endpoint.authority == "istiod.istio-system.svc:15012"


def test_neither_source_names_both_variables():
    with pytest.raises(ConfigError, match="set CA_ADDRESS .* or LOCAL_CA_DIR"):
        certificate_source(Config.from_env(BASE))


class CountingSource:
    def __init__(self, ca: LocalCA):
        self.ca, self.issued = ca, []

    def issue(self, identity, ttl):
        self.issued.append(identity)
        return self.ca.issue(identity, ttl)


def test_config_change_prefetches_new_and_forgets_departed_identities(tmp_path):
    init_ca(tmp_path / "ca")
    a, b, c = (Identity("cluster.local", "ns", n) for n in ("a", "b", "c"))

    def workload(identity, node="node1", protocol=TunnelProtocol.HBONE):
        return SimpleNamespace(identity=identity, node=node, protocol=protocol)

    async def main():
        source = CountingSource(LocalCA.load(tmp_path / "ca"))
        certs = CertificateManager(source, ttl=3600)
        app = App(Config.from_env({**BASE, "NODE_NAME": "node1"}))
        workloads = [workload(a), workload(b), workload(c, node="node2"), workload(c, protocol=TunnelProtocol.TCP)]
        app.ctx = SimpleNamespace(dedicated=False, certs=certs, state=SimpleNamespace(workloads=lambda: workloads))
        try:
            app._sync_certificates()
            assert certs.identities() == {a, b}  # c is on another node / not HBONE
            await asyncio.sleep(0)
            workloads[:] = [workload(b), workload(c)]  # a's last workload left, c arrived
            app._sync_certificates()
            assert certs.identities() == {b, c}
            assert certs.state(a) is None
            assert (await certs.get(c)).identity == c
            assert c in source.issued
        finally:
            await certs.close()

    uvloop.run(main())
