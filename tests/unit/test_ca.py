"""The local CA: root shape, leaf shape (istiod-like), validity arithmetic, file handling."""

from __future__ import annotations

import dataclasses
import stat
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ztunnel_fast.errors import IdentityError
from ztunnel_fast.identity.ca import (
    ROOT_CERT_FILE,
    ROOT_KEY_FILE,
    IssuedCertificate,
    LocalCA,
    init_ca,
)
from ztunnel_fast.identity.spiffe import Identity

ALICE = Identity("cluster.local", "shop", "alice")
NOW = datetime(2030, 5, 17, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ca")
    init_ca(directory, "cluster.local")
    return directory


@pytest.fixture(scope="module")
def ca(ca_dir):
    return LocalCA.load(ca_dir)


def _root(ca_dir) -> x509.Certificate:
    return x509.load_pem_x509_certificate((ca_dir / ROOT_CERT_FILE).read_bytes())


def _leaf(issued: IssuedCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.chain_pem[0])


def test_root_is_a_p256_ca_for_the_trust_domain(ca_dir):
    root = _root(ca_dir)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(root.public_key())
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "cluster.local"
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)  # self-signed
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)


def test_root_key_is_private(ca_dir):
    assert stat.S_IMODE((ca_dir / ROOT_KEY_FILE).stat().st_mode) == 0o600
    key = serialization.load_pem_private_key((ca_dir / ROOT_KEY_FILE).read_bytes(), None)
    assert key.public_key() == _root(ca_dir).public_key()


def test_leaf_chains_to_root_under_a_strict_verifier(ca, ca_dir):
    issued = ca.issue(ALICE, 3600)
    leaf = _leaf(issued)
    leaf.verify_directly_issued_by(_root(ca_dir))
    verifier = (
        PolicyBuilder().store(Store([_root(ca_dir)])).time(datetime.now(timezone.utc)).build_client_verifier()
    )
    verified = verifier.verify(leaf, [])
    assert [str(s.value) for s in verified.subjects] == [str(ALICE)]


def test_leaf_does_not_verify_under_another_root(ca, tmp_path):
    init_ca(tmp_path, "cluster.local")
    other_root = _root(tmp_path)
    verifier = PolicyBuilder().store(Store([other_root])).time(datetime.now(timezone.utc)).build_client_verifier()
    with pytest.raises(VerificationError):
        verifier.verify(_leaf(ca.issue(ALICE, 3600)), [])


def test_leaf_carries_only_the_spiffe_uri(ca):
    leaf = _leaf(ca.issue(ALICE, 3600, now=NOW - timedelta(days=1)))
    san_ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san_ext.critical  # empty subject => critical SAN (RFC 5280)
    assert list(san_ext.value) == [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/alice")]
    assert leaf.subject == x509.Name([])
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root = x509.load_pem_x509_certificate(ca.root_pem)
    assert aki.key_identifier == root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def test_leaf_key_is_fresh_p256_and_matches(ca):
    a, b = ca.issue(ALICE, 3600), ca.issue(ALICE, 3600)
    for issued in (a, b):
        key = serialization.load_pem_private_key(issued.key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        assert key.public_key() == _leaf(issued).public_key()
    assert a.key_pem != b.key_pem
    assert a.root_pem == ca.root_pem and len(a.chain_pem) == 1


def test_validity_is_ttl_from_issuance_with_capped_backdating(ca):
    day = ca.issue(ALICE, 86400, now=NOW)
    assert day.not_after == NOW + timedelta(seconds=86400)
    assert day.not_before == NOW - timedelta(seconds=60)  # capped clock-skew allowance
    assert day.refresh_at == day.not_before + (day.not_after - day.not_before) / 2
    leaf = _leaf(day)
    assert (leaf.not_valid_before_utc, leaf.not_valid_after_utc) == (day.not_before, day.not_after)
    assert day.serial == leaf.serial_number

    short = ca.issue(ALICE, 5, now=NOW)  # ttl/10 < 1 s: no backdating
    assert (short.not_before, short.not_after) == (NOW, NOW + timedelta(seconds=5))
    assert short.refresh_at == NOW + timedelta(seconds=2.5)

    hundred = ca.issue(ALICE, 100, now=NOW)
    assert hundred.not_before == NOW - timedelta(seconds=10)


def test_validity_truncates_to_whole_seconds(ca):
    now = NOW + timedelta(microseconds=900_000)
    issued = ca.issue(ALICE, 2.7, now=now)
    assert issued.not_after == NOW + timedelta(seconds=2)
    assert issued.not_after.microsecond == 0 and issued.not_before.microsecond == 0


def test_serials_are_unique_positive_128_bit(ca):
    serials = [ca.issue(ALICE, 60).serial for _ in range(64)]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2**128 for s in serials)


def test_issued_certificate_is_frozen(ca):
    issued = ca.issue(ALICE, 60)
    with pytest.raises(dataclasses.FrozenInstanceError):
        issued.serial = 1  # type: ignore[misc]


def test_issue_refuses_foreign_trust_domain_and_bad_ttl(ca, tmp_path):
    with pytest.raises(IdentityError, match="trust domain cluster.local cannot issue spiffe://other.local/"):
        ca.issue(Identity("other.local", "ns", "sa"), 60)
    with pytest.raises(IdentityError, match="at least 1 s"):
        ca.issue(ALICE, 0.5)
    init_ca(tmp_path, "cluster.local", validity_days=1)
    short_lived = LocalCA.load(tmp_path)
    with pytest.raises(IdentityError, match="root expires"):
        short_lived.issue(ALICE, 2 * 86400)


def test_init_refuses_to_overwrite(tmp_path):
    init_ca(tmp_path, "cluster.local")
    before = (tmp_path / ROOT_CERT_FILE).read_bytes(), (tmp_path / ROOT_KEY_FILE).read_bytes()
    with pytest.raises(IdentityError, match=str(tmp_path / ROOT_KEY_FILE)):
        init_ca(tmp_path, "cluster.local")
    assert ((tmp_path / ROOT_CERT_FILE).read_bytes(), (tmp_path / ROOT_KEY_FILE).read_bytes()) == before
    (tmp_path / ROOT_KEY_FILE).unlink()  # a lone cert is protected too
    with pytest.raises(IdentityError, match=str(tmp_path / ROOT_CERT_FILE)):
        init_ca(tmp_path, "cluster.local")


def test_init_force_replaces_the_root(tmp_path):
    init_ca(tmp_path, "cluster.local")
    first = (tmp_path / ROOT_CERT_FILE).read_bytes()
    init_ca(tmp_path, "mesh.example", force=True)
    assert (tmp_path / ROOT_CERT_FILE).read_bytes() != first
    assert LocalCA.load(tmp_path).trust_domain == "mesh.example"
    assert stat.S_IMODE((tmp_path / ROOT_KEY_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [ROOT_CERT_FILE, ROOT_KEY_FILE]  # no temp files


def test_load_errors_name_the_file(tmp_path, ca_dir):
    with pytest.raises(IdentityError, match=f"{tmp_path / ROOT_CERT_FILE}: local CA file is missing"):
        LocalCA.load(tmp_path)

    (tmp_path / ROOT_CERT_FILE).write_bytes((ca_dir / ROOT_CERT_FILE).read_bytes())
    with pytest.raises(IdentityError, match=f"{tmp_path / ROOT_KEY_FILE}: local CA file is missing"):
        LocalCA.load(tmp_path)

    (tmp_path / ROOT_KEY_FILE).write_bytes(b"garbage")
    with pytest.raises(IdentityError, match=f"{tmp_path / ROOT_KEY_FILE}: not an unencrypted PEM private key"):
        LocalCA.load(tmp_path)

    stranger = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / ROOT_KEY_FILE).write_bytes(stranger.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(IdentityError, match=f"{tmp_path / ROOT_KEY_FILE}: private key does not match"):
        LocalCA.load(tmp_path)

    (tmp_path / ROOT_CERT_FILE).write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(IdentityError, match=f"{tmp_path / ROOT_CERT_FILE}: not a PEM certificate"):
        LocalCA.load(tmp_path)


def test_load_round_trips(ca_dir, ca):
    again = LocalCA.load(ca_dir)
    assert again.root_pem == ca.root_pem == (ca_dir / ROOT_CERT_FILE).read_bytes()
    assert again.trust_domain == "cluster.local"
