"""pyOpenSSL contexts for HBONE mutual TLS, one server and one client context per local identity.

Built once per issued certificate (not per connection) by the certificate manager; connections made
from a context keep it alive, so replacing a certificate never disturbs live connections.

Invariants (ztunnel's `tls/workload.rs` behaviour):
- TLS 1.3 only (min = max = 1.3), ciphers TLS_AES_256_GCM_SHA384 and TLS_AES_128_GCM_SHA256 as ztunnel.
- ALPN: the client offers exactly [h2]; the server selects h2 and fails the handshake with a
  no_application_protocol alert when the client offers ALPN without h2.  A client offering no ALPN at
  all is refused after the handshake by `handshake()` (OpenSSL never calls the selector then).
- Server: a client certificate is required (VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT), its chain
  must lead to one of our roots, and its leaf must carry a SPIFFE id in our trust domain; the check
  runs in the verify callback at depth 0, so a foreign trust domain fails the handshake itself.
- Client: the server chain must lead to one of our roots (VERIFY_PEER).  Which identity the server
  must have depends on the destination, so it is checked after the handshake (`check_server_identity`).
- No SNI is ever sent; nothing here calls set_tlsext_host_name.
- No session resumption: OP_NO_TICKET and the session cache off on both sides.
- The mode flags pyOpenSSL sets (partial write, accept moving write buffer) are kept: the engine's
  SSL_write relies on them.  NO_AUTO_CHAIN is added: we send leaf + intermediates, never the root.
- Verify callbacks never return a silent "no": they raise TlsError with the reason, which pyOpenSSL
  re-raises from the same do_handshake() call that ran them.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from ..errors import TlsError
from ..identity.ca import IssuedCertificate
from .verify import check_trust_domain, verify_error_reason

ALPN_H2 = b"h2"
TLS13_CIPHERSUITES = b"TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"  # ztunnel's list, in its order
_NO_RESUMPTION = SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION
# openssl/ssl.h SSL_MODE_NO_AUTO_CHAIN (pyOpenSSL does not export it).  Without it OpenSSL builds the
# chain it sends from the trust store and ships our root on every handshake; we send leaf +
# intermediates only, as ztunnel does.
SSL_MODE_NO_AUTO_CHAIN = 0x00000008


def server_context(cert: IssuedCertificate, trust_domain: str) -> SSL.Context:
    """Inbound (port 15008) context presenting `cert`, accepting clients of `trust_domain` only."""
    ctx = _base_context(SSL.TLS_SERVER_METHOD, cert)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _server_verify(trust_domain))
    ctx.set_alpn_select_callback(_select_h2)
    return ctx


def client_context(cert: IssuedCertificate) -> SSL.Context:
    """Outbound context presenting `cert` and verifying the server chain against the same roots."""
    ctx = _base_context(SSL.TLS_CLIENT_METHOD, cert)
    ctx.set_verify(SSL.VERIFY_PEER, _client_verify)
    ctx.set_alpn_protos([ALPN_H2])
    return ctx


def _base_context(method: int, cert: IssuedCertificate) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    ctx.set_options(_NO_RESUMPTION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_mode(SSL_MODE_NO_AUTO_CHAIN)  # adds to pyOpenSSL's partial-write/moving-buffer modes
    try:
        chain = [x509.load_pem_x509_certificate(pem) for pem in cert.chain_pem]
        roots = x509.load_pem_x509_certificates(cert.root_pem)
        key = serialization.load_pem_private_key(cert.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"cannot build TLS context for {cert.identity}: {exc}") from None
    if not chain:
        raise TlsError(f"cannot build TLS context for {cert.identity}: empty certificate chain")
    ctx.use_certificate(chain[0])
    ctx.use_privatekey(key)
    for intermediate in chain[1:]:
        ctx.add_extra_chain_cert(intermediate)
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TlsError(f"cannot build TLS context for {cert.identity}: key does not match certificate") from None
    store = ctx.get_cert_store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    return ctx


def _server_verify(trust_domain: str):
    def verify(conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
        if not ok:
            raise TlsError(f"client certificate verify failed: {verify_error_reason(errnum)} (depth {depth})")
        if depth == 0:
            check_trust_domain(cert, trust_domain)  # raises TlsError naming the foreign identity
        return True

    return verify


def _client_verify(conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
    if not ok:
        raise TlsError(f"server certificate verify failed: {verify_error_reason(errnum)} (depth {depth})")
    return True


def _select_h2(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    if ALPN_H2 in offered:
        return ALPN_H2
    # Raising makes pyOpenSSL answer SSL_TLSEXT_ERR_ALERT_FATAL: a no_application_protocol alert.
    raise TlsError(
        f"client offered ALPN [{', '.join(p.decode('ascii', 'replace') for p in offered)}], h2 required"
    )
