"""istiod CA client, sans-IO: the CSR, the request, response parsing and its refusals, gRPC errors.

Certificates come from the fake istiod's real authority (fakes/ca_server.FakePki: root, second
root, intermediate); no sockets.
"""

from __future__ import annotations

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztunnel_fast.errors import IdentityError
from ztunnel_fast.fakes.ca_server import FakePki, _ca_cert, _name, _pem
from ztunnel_fast.identity import istiod_ca
from ztunnel_fast.identity.manager import BACKOFF_JITTER, MAX_BACKOFF, backoff_delay
from ztunnel_fast.identity.spiffe import Identity

ALICE = Identity("cluster.local", "shop", "alice")
BOB = Identity("cluster.local", "shop", "bob")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> FakePki:
    return FakePki.create(tmp_path_factory.mktemp("istiod-pki"))


def issued_chain(pki: FakePki, identity=ALICE, *, key=None, san=None) -> tuple[ec.EllipticCurvePrivateKey, list[str]]:
    """What istiod answers for a CSR of `key`: [leaf, intermediate, root bundle]."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    leaf = pki.sign(key.public_key(), san or str(identity), 3600)
    return key, [_pem(leaf).decode(), _pem(pki.intermediate).decode(), pki.root_bundle_pem.decode()]


# -- the request -------------------------------------------------------------------------------


def test_csr_is_p256_with_the_spiffe_uri_as_only_san():
    key, pem = istiod_ca.build_csr(ALICE)
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    assert csr.public_key().curve.name == "secp256r1"
    assert csr.public_key() == key.public_key()
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # empty subject
    assert [type(n) for n in san.value] == [x509.UniformResourceIdentifier]
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/shop/sa/alice"]
    assert list(csr.subject) == []
    # every CSR gets a fresh key
    assert istiod_ca.build_csr(ALICE)[0].public_key() != key.public_key()


def test_request_carries_ttl_seconds_and_impersonation_only_when_asked():
    shared = istiod_ca.build_request(b"CSR", 3600.9, ALICE, impersonate=True)
    assert shared.csr == "CSR" and shared.validity_duration == 3600
    assert dict(shared.metadata) == {"ImpersonatedIdentity": "spiffe://cluster.local/ns/shop/sa/alice"}
    dedicated = istiod_ca.build_request(b"CSR", 86400, ALICE, impersonate=False)
    assert dedicated.validity_duration == 86400 and not dedicated.HasField("metadata")
    with pytest.raises(IdentityError, match="at least 1 s"):
        istiod_ca.build_request(b"CSR", 0.5, ALICE, impersonate=False)


# -- the response ------------------------------------------------------------------------------


def test_chain_is_leaf_plus_intermediates_and_last_element_is_the_whole_bundle(pki):
    key, chain = issued_chain(pki)
    issued = istiod_ca.parse_response(ALICE, key, chain)
    assert issued.identity == ALICE
    leaf = x509.load_pem_x509_certificate(issued.chain_pem[0])
    assert [x509.load_pem_x509_certificate(c).subject for c in issued.chain_pem] == [leaf.subject, pki.intermediate.subject]
    roots = x509.load_pem_x509_certificates(issued.root_pem)
    assert roots == [pki.root, pki.other_root]  # both roots kept, none moved into the chain
    assert issued.serial == leaf.serial_number
    assert (issued.not_before, issued.not_after) == (leaf.not_valid_before_utc, leaf.not_valid_after_utc)
    assert serialization.load_pem_private_key(issued.key_pem, None).public_key() == key.public_key()


def test_leaf_and_intermediate_concatenated_in_the_first_element_are_split(pki):
    key, chain = issued_chain(pki)
    issued = istiod_ca.parse_response(ALICE, key, [chain[0] + chain[1], chain[2]])
    assert len(issued.chain_pem) == 2
    assert len(x509.load_pem_x509_certificates(issued.root_pem)) == 2


def test_san_mismatch_is_refused(pki):
    key, chain = issued_chain(pki, san=str(BOB))
    with pytest.raises(IdentityError, match="certificate for spiffe://cluster.local/ns/shop/sa/bob, asked for "
                                            "spiffe://cluster.local/ns/shop/sa/alice"):
        istiod_ca.parse_response(ALICE, key, chain)


def test_key_mismatch_is_refused(pki):
    _, chain = issued_chain(pki)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(IdentityError, match="public key is not the one in our CSR"):
        istiod_ca.parse_response(ALICE, other, chain)


def test_chain_that_does_not_reach_the_returned_roots_is_refused(pki, tmp_path):
    key, chain = issued_chain(pki)
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = _ca_cert(_name("cluster.local", "stranger"), stranger_key, _name("cluster.local", "stranger"),
                        stranger_key, days=1)
    with pytest.raises(IdentityError, match="does not verify to the returned roots"):
        istiod_ca.parse_response(ALICE, key, [chain[0], chain[1], _pem(stranger).decode()])
    # the intermediate missing: the leaf cannot reach the root either
    with pytest.raises(IdentityError, match="does not verify to the returned roots"):
        istiod_ca.parse_response(ALICE, key, [chain[0], chain[2]])


@pytest.mark.parametrize("elements, reason", [
    ([], "empty cert_chain"),
    (["LEAF"], "no root bundle"),
    (["garbage", "garbage"], r"cert_chain\[0\] is not PEM certificates"),
])
def test_malformed_responses_are_refused_by_name(pki, elements, reason):
    key, chain = issued_chain(pki)
    elements = [chain[0] if e == "LEAF" else e for e in elements]
    with pytest.raises(IdentityError, match=reason):
        istiod_ca.parse_response(ALICE, key, elements)


def test_garbage_root_bundle_is_refused(pki):
    key, chain = issued_chain(pki)
    with pytest.raises(IdentityError, match=r"cert_chain\[2\]"):
        istiod_ca.parse_response(ALICE, key, [chain[0], chain[1], "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])


def test_leaf_without_spiffe_san_is_refused(pki):
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = pki.sign(key.public_key(), "https://example.com/not-spiffe", 3600)
    with pytest.raises(IdentityError, match="returned a certificate for https://example.com/not-spiffe"):
        istiod_ca.parse_response(ALICE, key, [_pem(leaf).decode(), _pem(pki.intermediate).decode(),
                                              pki.root_bundle_pem.decode()])


def test_rpc_error_keeps_status_code_and_message():
    exc = grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               details="request impersonation authentication failure")
    err = istiod_ca.rpc_error(ALICE, exc)
    assert isinstance(err, IdentityError)
    assert str(err) == ("istiod CA request for spiffe://cluster.local/ns/shop/sa/alice failed: "
                        "UNAUTHENTICATED: request impersonation authentication failure")


# -- retry delays (the certificate manager) ----------------------------------------------------


def test_backoff_jitter_stays_within_twenty_percent_of_the_doubling_base():
    bases = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 150.0, 150.0]
    assert BACKOFF_JITTER == 0.2
    for n, base in enumerate(bases, start=1):
        low, high = backoff_delay(n, 0.0), backoff_delay(n, 0.999999)
        assert low == pytest.approx(base * 0.8) and high == pytest.approx(base * 1.2, rel=1e-5)
        assert backoff_delay(n, 0.5) == base
        for r in (0.1, 0.3, 0.7, 0.9):
            assert low <= backoff_delay(n, r) <= high
    assert backoff_delay(10_000, 0.999999) <= MAX_BACKOFF * 1.2
    assert backoff_delay(0, 0.3) == 0.0
