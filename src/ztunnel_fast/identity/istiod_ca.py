"""istiod's CA client: workload certificates from `IstioCertificateService/CreateCertificate`.

Role (ztunnel's `identity/caclient.rs`): a CertificateSource whose `issue(identity, ttl)` makes a
fresh ECDSA P-256 key and a CSR naming the SPIFFE id as its only subject alternative name (a URI),
asks istiod on CA_ADDRESS to sign it for `ttl` seconds (SECRET_TTL), and checks what comes back
before anyone uses it.  The certificate manager (manager.py) owns renewal, backoff and the
concurrency limit; this module does one request per call.

The sans-IO parts (`build_csr`, `build_request`, `parse_response`, `rpc_error`) decide everything
and are tested without sockets; `IstiodCA` only adds the gRPC channel and the call metadata.

Invariants:
- The response is `[leaf, intermediates..., root bundle]`: the last element is the trust bundle
  and may hold several roots; it is never split into the chain we present.  Those roots become
  the trust anchors of the TLS contexts built from the certificate, so peers are verified
  against istiod's roots.
- A certificate is refused (IdentityError naming the reason) unless its leaf's SPIFFE id is the
  one we asked for, its public key is ours, and leaf + intermediates verify to the returned roots
  with the same OpenSSL verifier the TLS handshake uses.
- `ImpersonatedIdentity` is sent only in shared mode (one ztunnel for many workloads); in
  dedicated mode the caller's own token already names the identity.
- The bearer token is read on every call (rotated projected tokens); the channel is rebuilt when
  the roots file changes (its fingerprint), so a rotated istiod root is picked up without restart.
- gRPC failures become IdentityError("... <STATUS>: <message>") so the log line and config_dump
  state carry istiod's status code and message (e.g. UNAUTHENTICATED "request impersonation
  authentication failure").
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID
from google.protobuf import struct_pb2
from OpenSSL import crypto

from .. import istiod
from ..config import IstiodEndpoint
from ..errors import IdentityError
from ..protos import ca_pb2, ca_pb2_grpc
from .ca import IssuedCertificate
from .spiffe import Identity

log = logging.getLogger(__name__)

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"  # istiod's metadata key for node-mode requests
ROOT_SOURCE = "CA_ROOT_CA"  # the variable named in errors about the roots
# seconds: a hung istiod must not hold one of the manager's 8 issuance slots forever; the
# manager retries with backoff after it.
REQUEST_TIMEOUT = 30.0
CHANNEL_CLOSE_GRACE = 5.0  # seconds a replaced channel may finish calls already on it


# -- sans-IO: the request --------------------------------------------------------------------


def build_csr(identity: Identity) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a PEM CSR whose only SAN is the SPIFFE URI (empty subject, as ztunnel)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,  # an empty subject makes the SAN critical (RFC 5280 4.2.1.6)
        )
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def build_request(csr_pem: bytes, ttl: float, identity: Identity, *, impersonate: bool) -> ca_pb2.IstioCertificateRequest:
    """The CreateCertificate request: CSR, validity in whole seconds, impersonation in shared mode."""
    seconds = math.floor(ttl)
    if seconds < 1:
        raise IdentityError(f"certificate ttl must be at least 1 s, got {ttl}")
    request = ca_pb2.IstioCertificateRequest(csr=csr_pem.decode("ascii"), validity_duration=seconds)
    if impersonate:
        request.metadata.CopyFrom(struct_pb2.Struct())
        request.metadata[IMPERSONATED_IDENTITY] = str(identity)
    return request


# -- sans-IO: the response -------------------------------------------------------------------


@dataclass(frozen=True)
class SplitChain:
    """`cert_chain` split by ztunnel's rule: leaf, intermediates, then the root bundle."""

    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]


def split_chain(identity: Identity, cert_chain) -> SplitChain:
    """Parse the response elements; the last one is the root bundle (possibly several roots)."""
    elements = list(cert_chain)
    if not elements:
        raise IdentityError(f"istiod CA returned no certificate for {identity}: empty cert_chain")
    if len(elements) < 2:
        raise IdentityError(
            f"istiod CA response for {identity} has no root bundle: cert_chain holds only the leaf")
    parsed = [_pem_certificates(identity, i, text) for i, text in enumerate(elements)]
    # istiod puts one certificate per element, but older CAs concatenated leaf and intermediates.
    first = parsed[0]
    intermediates = tuple(first[1:]) + tuple(c for certs in parsed[1:-1] for c in certs)
    return SplitChain(leaf=first[0], intermediates=intermediates, roots=tuple(parsed[-1]))


def parse_response(
    identity: Identity,
    key: ec.EllipticCurvePrivateKey,
    cert_chain,
    now: datetime | None = None,
) -> IssuedCertificate:
    """Check the response against the request and return the certificate; IdentityError otherwise."""
    split = split_chain(identity, cert_chain)
    leaf = split.leaf
    got = leaf_identity(leaf)
    if got != str(identity):
        raise IdentityError(
            f"istiod CA returned a certificate for {got or 'no SPIFFE id'}, asked for {identity}")
    if leaf.public_key() != key.public_key():
        raise IdentityError(
            f"istiod CA returned a certificate for {identity} whose public key is not the one in our CSR")
    verify_chain(identity, split, now)
    pem = serialization.Encoding.PEM
    return IssuedCertificate(
        identity=identity,
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        chain_pem=tuple(c.public_bytes(pem) for c in (leaf, *split.intermediates)),
        root_pem=b"".join(c.public_bytes(pem) for c in split.roots),
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


def leaf_identity(leaf: x509.Certificate) -> str | None:
    """The first URI SAN of the leaf (ztunnel's "the" identity of a certificate), or None."""
    try:
        san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def verify_chain(identity: Identity, split: SplitChain, now: datetime | None = None) -> None:
    """Leaf + intermediates must lead to one of the returned roots (OpenSSL, as the handshake)."""
    store = crypto.X509Store()
    for root in split.roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    now = now or datetime.now(timezone.utc)
    # A CA whose clock runs a little ahead issues a not-yet-valid leaf; it is still the one we
    # asked for, and expiry is judged by the manager.  Judge the signatures at a time the leaf
    # is valid, so skew is not mistaken for a bad chain.
    store.set_time(max(now, split.leaf.not_valid_before_utc))
    chain = [crypto.X509.from_cryptography(c) for c in split.intermediates]
    try:
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(split.leaf), chain).verify_certificate()
    except crypto.X509StoreContextError as exc:
        reason = exc.args[0] if exc.args else str(exc)
        raise IdentityError(
            f"istiod CA returned a certificate for {identity} that does not verify to the returned roots: {reason}"
        ) from None


def rpc_error(identity: Identity, exc: grpc.aio.AioRpcError) -> IdentityError:
    """istiod's status as an IdentityError carrying its code name and message."""
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    return IdentityError(f"istiod CA request for {identity} failed: {name}: {exc.details() or ''}".rstrip())


def _pem_certificates(identity: Identity, index: int, text) -> list[x509.Certificate]:
    data = text.encode() if isinstance(text, str) else bytes(text)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(
            f"istiod CA response for {identity}: cert_chain[{index}] is not PEM certificates ({exc})") from None
    if not certs:
        raise IdentityError(f"istiod CA response for {identity}: cert_chain[{index}] holds no certificate")
    return certs


# -- I/O: the client -------------------------------------------------------------------------


class IstiodCA:
    """CertificateSource backed by istiod's CA over gRPC (TLS, bearer token, clusterid)."""

    def __init__(
        self,
        endpoint: IstiodEndpoint,
        *,
        auth_token: str | None,
        cluster_id: str,
        impersonate: bool,
        timeout: float = REQUEST_TIMEOUT,
    ):
        self.endpoint = endpoint
        self._auth_token = auth_token
        self._cluster_id = cluster_id
        self._impersonate = impersonate
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: ca_pb2_grpc.IstioCertificateServiceStub | None = None
        self._fingerprint: str | None = None
        self._closing: set[asyncio.Task] = set()
        self.channels_opened = 0  # how many channels were built (first one + root rotations)

    async def issue(self, identity: Identity, ttl: float) -> IssuedCertificate:
        key, csr = build_csr(identity)
        request = build_request(csr, ttl, identity, impersonate=self._impersonate)
        stub = self._current_stub()
        try:
            token = istiod.read_token(self._auth_token)
        except OSError as exc:
            raise IdentityError(f"cannot read AUTH_TOKEN {self._auth_token}: {exc.strerror}") from None
        metadata = istiod.call_metadata(self.endpoint, token, self._cluster_id)
        try:
            response = await stub.CreateCertificate(request, metadata=metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(identity, exc) from None
        return parse_response(identity, key, response.cert_chain)

    def _current_stub(self) -> ca_pb2_grpc.IstioCertificateServiceStub:
        fingerprint = istiod.roots_fingerprint(self.endpoint)
        if self._stub is None or fingerprint != self._fingerprint:
            if self._channel is not None:
                log.info("CA root certificate changed, reconnecting to %s", self.endpoint.address)
                self._retire(self._channel)
            self._channel = istiod.open_channel(self.endpoint, ROOT_SOURCE)
            self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
            self._fingerprint = fingerprint
            self.channels_opened += 1
        return self._stub

    def _retire(self, channel: grpc.aio.Channel) -> None:
        # Calls already on the old channel finish there (bounded by the grace); new calls use the
        # new one.
        task = asyncio.get_running_loop().create_task(channel.close(CHANNEL_CLOSE_GRACE), name="ca-channel-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
