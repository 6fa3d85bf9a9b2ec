"""istiod CA client against the fake istiod CA over real gRPC + TLS on loopback.

The fake (fakes/ca_server.py) serves `istiod.istio-system.svc` from its intermediate, checks the
bearer token and clusterid, enforces the impersonation allow-list and records every request.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
import uvloop
from cryptography import x509

from ztunnel_fast.config import IstiodEndpoint
from ztunnel_fast.errors import IdentityError
from ztunnel_fast.fakes.ca_server import ISTIOD_NAME, Caller, FakeCA, FakeCaServer, FakePki
from ztunnel_fast.identity.istiod_ca import IstiodCA
from ztunnel_fast.identity.manager import CertificateManager
from ztunnel_fast.identity.spiffe import Identity

ALICE = Identity("cluster.local", "shop", "alice")
BOB = Identity("cluster.local", "shop", "bob")
ZTUNNEL = "istio-system/ztunnel"
WAIT = 10.0  # seconds: upper bound for a bounded wait, never a pass condition


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> FakePki:
    return FakePki.create(tmp_path_factory.mktemp("istiod-pki"))


def run(coro):
    return uvloop.run(coro)


async def wait_for(cond, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


class Harness:
    """A started fake CA and a client pointed at it."""

    def __init__(self, pki: FakePki, tmp: Path, *, callers, impersonate: bool, token: str = "jwt-1",
                 root: Path | None = None, headers=(), cluster_id="Kubernetes"):
        self.ca = FakeCA(pki, callers=callers)
        self.server = FakeCaServer(self.ca)
        self.token_path = tmp / "istio-token"
        self.token_path.write_text(token + "\n")
        self.root = root or pki.root_path
        self.impersonate, self.headers, self.cluster_id = impersonate, headers, cluster_id
        self.client: IstiodCA | None = None

    async def __aenter__(self) -> "Harness":
        port = await self.server.start("127.0.0.1", 0)
        endpoint = IstiodEndpoint(f"https://127.0.0.1:{port}", root_ca=str(self.root), server_name=ISTIOD_NAME,
                                  headers=self.headers)
        self.client = IstiodCA(endpoint, auth_token=str(self.token_path), cluster_id=self.cluster_id,
                               impersonate=self.impersonate)
        return self

    async def __aexit__(self, *exc):
        await self.client.close()
        await self.server.stop()


def node_callers(*ids: Identity, token="jwt-1") -> dict[str, Caller]:
    return {token: Caller(ZTUNNEL, frozenset(str(i) for i in ids))}


def test_dedicated_mode_sends_token_clusterid_and_headers_without_impersonation(pki, tmp_path):
    async def main():
        callers = {"jwt-1": Caller("shop/alice")}
        async with Harness(pki, tmp_path, callers=callers, impersonate=False,
                           headers=(("x-tenant", "blue"),), cluster_id="c1") as h:
            h.ca.cluster_id = "c1"
            issued = await h.client.issue(ALICE, 3600)
            assert issued.identity == ALICE
            (req,) = h.ca.requests
            assert req.metadata["authorization"] == "Bearer jwt-1"
            assert req.metadata["clusterid"] == "c1"
            assert req.metadata["x-tenant"] == "blue"
            assert req.impersonated is None
            assert req.validity_duration == 3600
            assert req.csr_sans == [str(ALICE)] and req.csr_key == "EC secp256r1"
            roots = x509.load_pem_x509_certificates(issued.root_pem)
            assert roots == [pki.root, pki.other_root]
            assert len(issued.chain_pem) == 2  # leaf + the fake's intermediate

    run(main())


def test_shared_mode_impersonates_only_allowed_identities(pki, tmp_path):
    async def main():
        async with Harness(pki, tmp_path, callers=node_callers(ALICE), impersonate=True) as h:
            assert (await h.client.issue(ALICE, 600)).identity == ALICE
            assert h.ca.requests[-1].impersonated == str(ALICE)
            with pytest.raises(IdentityError, match="UNAUTHENTICATED: request impersonation authentication failure"):
                await h.client.issue(BOB, 600)  # no pod of bob on this node
            assert [r.status for r in h.ca.requests] == ["OK", "UNAUTHENTICATED"]

    run(main())


def test_unknown_token_and_wrong_cluster_are_unauthenticated(pki, tmp_path):
    async def main():
        async with Harness(pki, tmp_path, callers=node_callers(ALICE, token="other"), impersonate=True) as h:
            with pytest.raises(IdentityError, match="UNAUTHENTICATED: request authenticate failure"):
                await h.client.issue(ALICE, 600)
        async with Harness(pki, tmp_path, callers=node_callers(ALICE), impersonate=True, cluster_id="elsewhere") as h:
            with pytest.raises(IdentityError, match="UNAUTHENTICATED: request authenticate failure"):
                await h.client.issue(ALICE, 600)
            assert h.ca.requests[0].metadata["clusterid"] == "elsewhere"

    run(main())


def test_token_file_is_read_on_every_call(pki, tmp_path):
    async def main():
        callers = {**node_callers(ALICE, token="jwt-1"), **node_callers(ALICE, token="jwt-2")}
        async with Harness(pki, tmp_path, callers=callers, impersonate=True) as h:
            await h.client.issue(ALICE, 600)
            h.token_path.write_text("jwt-2\n")  # the kubelet rotated the projected token
            await h.client.issue(ALICE, 600)
            assert [r.metadata["authorization"] for r in h.ca.requests] == ["Bearer jwt-1", "Bearer jwt-2"]

    run(main())


def test_changed_root_file_rebuilds_the_channel(pki, tmp_path):
    async def main():
        stranger = FakePki.create(tmp_path / "stranger")  # a root that did not sign istiod's cert
        root = tmp_path / "root-cert.pem"
        shutil.copy(stranger.root_path, root)
        async with Harness(pki, tmp_path, callers=node_callers(ALICE), impersonate=True, root=root) as h:
            with pytest.raises(IdentityError, match="UNAVAILABLE"):
                await h.client.issue(ALICE, 600)
            assert h.ca.requests == []  # TLS refused before any call reached the CA
            shutil.copy(pki.root_path, root)  # the operator rotated the mounted root
            assert (await h.client.issue(ALICE, 600)).identity == ALICE
            assert h.client.channels_opened == 2
            await h.client.issue(ALICE, 600)
            assert h.client.channels_opened == 2  # unchanged roots: same channel

    run(main())


def test_wrong_san_and_garbage_are_refused(pki, tmp_path):
    async def main():
        async with Harness(pki, tmp_path, callers=node_callers(ALICE), impersonate=True) as h:
            h.ca.wrong_san = str(BOB)
            with pytest.raises(IdentityError, match=f"certificate for {BOB}, asked for {ALICE}"):
                await h.client.issue(ALICE, 600)
            h.ca.wrong_san, h.ca.garbage = None, True
            with pytest.raises(IdentityError, match=r"cert_chain\[0\] is not PEM"):
                await h.client.issue(ALICE, 600)

    run(main())


def test_manager_renews_at_half_life_from_istiod(pki, tmp_path):
    async def main():
        async with Harness(pki, tmp_path, callers=node_callers(ALICE), impersonate=True) as h:
            manager = CertificateManager(h.client, ttl=2)  # refresh 1 s after issuance
            try:
                first = await manager.get(ALICE)
                await wait_for(lambda: len(h.ca.requests) >= 2)
                await wait_for(lambda: manager.snapshot()[0]["certChain"][0]["serialNumber"] != str(first.serial))
                second = await manager.get(ALICE)
                assert second.serial != first.serial
                assert second.issued.not_after > first.issued.not_after
                assert [r.validity_duration for r in h.ca.requests[:2]] == [2, 2]
                assert [r.status for r in h.ca.requests[:2]] == ["OK", "OK"]
                # the trust anchors of the TLS contexts are istiod's bundle
                assert x509.load_pem_x509_certificates(second.issued.root_pem) == [pki.root, pki.other_root]
            finally:
                await manager.close()

    run(main())


def test_manager_keeps_the_valid_certificate_through_a_ca_outage(pki, tmp_path):
    async def main():
        # By the manager's clock the certificate is past half-life as soon as it is issued, so
        # renewals follow each other (MIN_REFRESH_DELAY apart) while it stays valid for an hour.
        clock = {"now": time.time() + 1799}
        async with Harness(pki, tmp_path, callers=node_callers(ALICE), impersonate=True) as h:
            manager = CertificateManager(h.client, ttl=3600, clock=lambda: clock["now"], rand=lambda: 0.0)
            try:
                first = await manager.get(ALICE)
                h.ca.fail_next = 2  # istiod fails the next two renewals
                await wait_for(lambda: any(r.status == "UNAVAILABLE" for r in h.ca.requests))
                assert manager.state(ALICE) == "Available"
                assert (await manager.get(ALICE)) is first  # still served while valid
                await wait_for(lambda: [r.status for r in h.ca.requests][:4] == ["OK", "UNAVAILABLE", "UNAVAILABLE", "OK"]
                               and (manager.snapshot()[0]["certChain"][0]["serialNumber"] != str(first.serial)))
                assert (await manager.get(ALICE)).serial != first.serial
            finally:
                await manager.close()

    run(main())


def test_fake_ca_authenticates_before_it_reads_the_csr(pki, tmp_path):
    """The double answers as istiod does: bad token first, then a bad CSR, by status code."""
    import grpc

    from ztunnel_fast.protos import ca_pb2, ca_pb2_grpc

    async def main():
        async with Harness(pki, tmp_path, callers={"jwt-1": Caller("shop/alice")}, impersonate=False) as h:
            creds = grpc.ssl_channel_credentials(pki.root_path.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{h.server.port}", creds,
                                               options=[("grpc.ssl_target_name_override", ISTIOD_NAME)]) as ch:
                stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
                bad = ca_pb2.IstioCertificateRequest(csr="not a csr", validity_duration=60)
                codes = []
                for token in ("wrong", "jwt-1"):
                    md = (("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes"))
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.CreateCertificate(bad, metadata=md)
                    codes.append((err.value.code(), err.value.details()))
                assert codes == [(grpc.StatusCode.UNAUTHENTICATED, "request authenticate failure"),
                                 (grpc.StatusCode.INVALID_ARGUMENT, "CSR parsing error")]
                assert [r.status for r in h.ca.requests] == ["UNAUTHENTICATED", "INVALID_ARGUMENT"]

    run(main())
