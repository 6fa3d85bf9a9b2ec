"""HBONE mutual TLS on pyOpenSSL: per-identity contexts, SPIFFE peer checks, async handshakes.

cryptography's bundled OpenSSL (through pyOpenSSL) is the only OpenSSL on the data path; the
stdlib `ssl` module is never used here.
"""

from .context import ALPN_H2, client_context, server_context
from .handshake import describe_ssl_error, handshake
from .verify import check_server_identity, check_trust_domain, peer_identities

__all__ = [
    "ALPN_H2",
    "check_server_identity",
    "check_trust_domain",
    "client_context",
    "describe_ssl_error",
    "handshake",
    "peer_identities",
    "server_context",
]
