"""The built-in local CA: issues workload certificates when no istiod is there to do it.

Role: `init_ca` writes a self-signed ECDSA P-256 root (`root-key.pem`, mode 0600, and
`root-cert.pem`) into a directory; `LocalCA.load` reads it back and `LocalCA.issue` signs workload
certificates shaped like istiod's: a fresh P-256 key, the SPIFFE id as the only subject alternative
name (a URI), an empty subject (so the SAN extension is critical, RFC 5280 4.2.1.6), key usage
digitalSignature + keyEncipherment, extended key usage serverAuth + clientAuth, a random 128-bit
serial.

Invariants:
- An IssuedCertificate's `not_before`/`not_after` are the values encoded in the leaf (whole seconds,
  UTC), so `refresh_at` is computed from what peers will actually check.
- `not_after` = issuance time + ttl; `not_before` = issuance time - min(60 s, ttl / 10): backdated
  like istiod does (it uses 2 min) so a peer whose clock lags a little still accepts a fresh cert,
  while a short ttl keeps a meaningful half-life.
- A LocalCA only issues identities of its own trust domain (the root's subject O); anything else is
  a configuration mistake that peers would reject anyway.
- The root key file is created with mode 0600 and never left half-written (temp file + rename).

`CertificateSource` is what the certificate manager depends on; istiod's CA client implements the
same protocol (its `issue` may be a coroutine function).
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Awaitable, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import IdentityError
from .spiffe import DEFAULT_TRUST_DOMAIN, Identity

ROOT_KEY_FILE = "root-key.pem"
ROOT_CERT_FILE = "root-cert.pem"
ROOT_COMMON_NAME = "ztunnel-fast local root"
MAX_CLOCK_SKEW = timedelta(seconds=60)  # backdating cap; istiod uses 2 min (ClockSkewGracePeriod)
SERIAL_BITS = 128  # as istiod: random serial below 2**128 (positive, fits the 20-octet limit)


@dataclass(frozen=True)
class IssuedCertificate:
    """A workload certificate with its key, as a CA returned it.

    `chain_pem` is leaf first, then any intermediates; the root is never in it (it lives in
    `root_pem`, which may hold several PEM certificates: a trust bundle).
    """

    identity: Identity
    key_pem: bytes
    chain_pem: tuple[bytes, ...]
    root_pem: bytes
    serial: int
    not_before: datetime
    not_after: datetime

    @property
    def refresh_at(self) -> datetime:
        """Half-life of the validity window, when ztunnel renews a certificate."""
        return self.not_before + (self.not_after - self.not_before) / 2


class CertificateSource(Protocol):
    """Anything that issues workload certificates: the local CA, or istiod's CA client (async)."""

    def issue(self, identity: Identity, ttl: float) -> IssuedCertificate | Awaitable[IssuedCertificate]:
        ...


def init_ca(
    directory: Path,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    validity_days: int = 3650,
    *,
    force: bool = False,
) -> None:
    """Create a self-signed root in `directory`; refuse to replace an existing one unless `force`."""
    directory = Path(directory)
    key_path, cert_path = directory / ROOT_KEY_FILE, directory / ROOT_CERT_FILE
    if not force:
        for path in (key_path, cert_path):
            if path.exists():
                raise IdentityError(
                    f"{path}: a local CA root already exists; refusing to overwrite it (force replaces it)"
                )
    if not trust_domain or "/" in trust_domain:
        raise IdentityError(f"invalid trust domain {trust_domain!r}")
    if validity_days < 1:
        raise IdentityError(f"root validity must be at least one day, got {validity_days}")

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc).replace(microsecond=0)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, ROOT_COMMON_NAME),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(now - MAX_CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Key first: a crash in between leaves a key without a cert, which load() reports by name.
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


class LocalCA:
    """A loaded root (certificate + key) that signs workload certificates."""

    def __init__(self, root_cert: x509.Certificate, root_key, *, source: str = "<memory>"):
        if not _is_ca(root_cert):
            raise IdentityError(f"{source}: certificate is not a CA (BasicConstraints CA:true missing)")
        if root_cert.public_key() != root_key.public_key():
            raise IdentityError(f"{source}: private key does not match the root certificate")
        orgs = root_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        if not orgs:
            raise IdentityError(f"{source}: root subject has no O=<trust domain>")
        self.trust_domain: str = str(orgs[0].value)
        self._cert = root_cert
        self._key = root_key
        try:
            self._ski = root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            self._ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
        self.root_pem: bytes = root_cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load(cls, directory: Path) -> "LocalCA":
        directory = Path(directory)
        key_path, cert_path = directory / ROOT_KEY_FILE, directory / ROOT_CERT_FILE
        cert_bytes = _read(cert_path)
        key_bytes = _read(key_path)
        try:
            cert = x509.load_pem_x509_certificate(cert_bytes)
        except ValueError as exc:
            raise IdentityError(f"{cert_path}: not a PEM certificate ({exc})") from None
        try:
            key = serialization.load_pem_private_key(key_bytes, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
        if cert.public_key() != key.public_key():
            raise IdentityError(f"{key_path}: private key does not match {cert_path}")
        return cls(cert, key, source=str(cert_path))

    def issue(self, identity: Identity, ttl: float, now: datetime | None = None) -> IssuedCertificate:
        """Sign a fresh P-256 workload certificate for `identity`, valid `ttl` seconds from `now`.

        `ttl` is rounded down to whole seconds (X.509 time granularity) and must be at least 1 s.
        """
        if identity.trust_domain != self.trust_domain:
            raise IdentityError(
                f"local CA of trust domain {self.trust_domain} cannot issue {identity}"
            )
        lifetime = timedelta(seconds=math.floor(ttl))
        if lifetime < timedelta(seconds=1):
            raise IdentityError(f"certificate ttl must be at least 1 s, got {ttl}")
        now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)
        skew = min(MAX_CLOCK_SKEW, timedelta(seconds=math.floor(lifetime.total_seconds() / 10)))
        not_before, not_after = now - skew, now + lifetime
        root_not_after = self._cert.not_valid_after_utc
        if not_after > root_not_after:
            raise IdentityError(
                f"cannot issue {identity} until {not_after:%Y-%m-%dT%H:%M:%SZ}: "
                f"the local CA root expires at {root_not_after:%Y-%m-%dT%H:%M:%SZ}"
            )

        key = ec.generate_private_key(ec.SECP256R1())
        serial = _random_serial()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # Empty subject: the SAN must be critical (RFC 5280 4.2.1.6), as istiod issues it.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .sign(self._key, _signature_hash(self._key))
        )
        return IssuedCertificate(
            identity=identity,
            key_pem=key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            chain_pem=(leaf.public_bytes(serialization.Encoding.PEM),),
            root_pem=self.root_pem,
            serial=serial,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )


def _random_serial() -> int:
    # Never 0: serials must be positive (RFC 5280 4.1.2.2).
    return secrets.randbelow(2**SERIAL_BITS - 1) + 1


def _signature_hash(key):
    # EdDSA keys sign without a separate digest; every other key type uses SHA-256.
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{path}: local CA file is missing") from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read local CA file ({exc.strerror})") from None


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what we ask for
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
