"""Test PKI: a root CA and SPIFFE leaf certificates shaped like Istio's workload certificates.

ECDSA P-256 keys, leaf subject empty with a *critical* URI SAN only (SPIFFE X.509-SVID), both
serverAuth and clientAuth, issued directly by the root (chain = leaf, trust bundle = root).
Only for tests and Envoy interop configs; nothing here is used by the product.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "cluster.local"


def spiffe_id(ns: str, sa: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"


SLEEP_ID = spiffe_id("default", "sleep")
HTTPBIN_ID = spiffe_id("default", "httpbin")


@dataclass(frozen=True)
class CertPaths:
    cert: Path  # leaf certificate chain (PEM; the leaf only, issued by the root)
    key: Path  # PKCS#8 private key (PEM)
    root: Path  # trust bundle: the root CA (PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertAuthority:
    """A self-signed root for one trust domain that issues SPIFFE leaf certificates."""

    def __init__(self, trust_domain: str = TRUST_DOMAIN, validity_days: int = 2) -> None:
        self.trust_domain = trust_domain
        self._validity = dt.timedelta(days=validity_days)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(now + self._validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def root_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, spiffe_uri: str) -> tuple[bytes, bytes]:
        """Return (cert_pem, key_pem) for a leaf whose only identity is the URI SAN `spiffe_uri`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # SPIFFE: identity lives in the SAN only
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + self._validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            # empty subject => SAN must be critical (RFC 5280 4.2.1.6)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_uri)]), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def write_root(self, directory: Path | str) -> Path:
        path = Path(directory) / "root-cert.pem"
        path.write_bytes(self.root_pem)
        return path

    def write(self, directory: Path | str, name: str, spiffe_uri: str) -> CertPaths:
        """Issue a leaf for `spiffe_uri` and write <name>-cert.pem, <name>-key.pem and root-cert.pem."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cert_pem, key_pem = self.issue(spiffe_uri)
        cert, key = d / f"{name}-cert.pem", d / f"{name}-key.pem"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        key.chmod(0o600)
        return CertPaths(cert=cert, key=key, root=self.write_root(d))
