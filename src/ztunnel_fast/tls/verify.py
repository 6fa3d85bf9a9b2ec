"""SPIFFE checks on peer certificates: who the peer is and whether we accept it.  Pure: no sockets.

Rules (as ztunnel's `tls/certificate.rs` and `tls/workload.rs`):
- A peer's identities are the URI SANs of its *leaf* certificate that parse as SPIFFE ids, in the
  order the certificate lists them; other URIs and every other SAN type are ignored.  The first one
  is "the" peer identity.
- Outbound (we are the client): chain validation is OpenSSL's job; afterwards any SAN must be one of
  the expected identities (destination workload + service SANs).  DNS names are never checked.
- Inbound (we are the server): the client's leaf must carry a SPIFFE id in *our* trust domain;
  which identity may talk to which workload is left to authorization.

Every rejection is a TlsError whose message reads well in a log line.
"""

from __future__ import annotations

from typing import Collection

from cryptography import x509
from OpenSSL import SSL, crypto

from ..errors import IdentityError, TlsError
from ..identity.spiffe import Identity

# OpenSSL X509_V_ERR_* codes (x509_vfy.h; the numbers are ABI, stable from 1.1 to 4.x) we name in
# log lines without reaching into OpenSSL's private bindings.  Wording follows OpenSSL's own.
X509_VERIFY_ERRORS: dict[int, str] = {
    2: "unable to get issuer certificate",
    4: "unable to decrypt certificate's signature",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "format error in certificate's notBefore field",
    14: "format error in certificate's notAfter field",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "issuer certificate doesn't have a public key",
    25: "path length constraint exceeded",
    26: "unsuitable certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
    32: "key usage does not include certificate signing",
    34: "unhandled critical extension",
    79: "invalid CA certificate",
}


def verify_error_reason(errnum: int) -> str:
    """A readable name for an OpenSSL certificate verification error number."""
    return X509_VERIFY_ERRORS.get(errnum, f"X509 verify error {errnum}")


def _leaf(conn_or_cert: SSL.Connection | x509.Certificate | crypto.X509) -> x509.Certificate | None:
    if isinstance(conn_or_cert, x509.Certificate):
        return conn_or_cert
    if isinstance(conn_or_cert, crypto.X509):
        return conn_or_cert.to_cryptography()
    if isinstance(conn_or_cert, SSL.Connection):
        return conn_or_cert.get_peer_certificate(as_cryptography=True)
    raise TypeError(f"expected an SSL.Connection or a certificate, got {type(conn_or_cert).__name__}")


def peer_identities(conn_or_cert: SSL.Connection | x509.Certificate | crypto.X509) -> list[Identity]:
    """The SPIFFE ids in the leaf's URI SANs, in order; [] when there is no certificate or none."""
    leaf = _leaf(conn_or_cert)
    if leaf is None:
        return []
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    identities = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            identities.append(Identity.parse(uri))
        except IdentityError:
            continue  # not a SPIFFE id: ignored, as ztunnel does
    return identities


def check_server_identity(conn: SSL.Connection, expected: Collection[Identity]) -> Identity:
    """Return the server's SAN that is one of `expected`; TlsError when none is."""
    if conn.get_peer_certificate(as_cryptography=True) is None:
        raise TlsError("server presented no certificate")
    presented = peer_identities(conn)
    for identity in presented:
        if identity in expected:
            return identity
    raise TlsError(
        f"server identity {_render(presented)} not in expected [{', '.join(map(str, expected))}]"
    )


def check_trust_domain(
    cert: SSL.Connection | x509.Certificate | crypto.X509, trust_domain: str
) -> Identity:
    """Return the peer's first SPIFFE id in `trust_domain`; TlsError when it has none."""
    presented = peer_identities(cert)
    for identity in presented:
        if identity.trust_domain == trust_domain:
            return identity
    if not presented:
        raise TlsError("client certificate has no SPIFFE URI SAN")
    raise TlsError(f"client identity {_render(presented)} is not in trust domain {trust_domain}")


def _render(identities: list[Identity]) -> str:
    if not identities:
        return "(no SPIFFE id)"
    return ", ".join(map(str, identities))
