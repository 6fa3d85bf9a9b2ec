"""The certificate manager: one workload certificate per identity, fetched on demand, kept fresh.

Role (ztunnel's `identity/manager.rs`): `get(identity)` returns a WorkloadCertificate (the issued
certificate plus the pyOpenSSL server and client contexts built from it), issuing it on first use.
One task per identity (named `cert-manager <spiffe id>`) issues, then sleeps until the half-life of
the certificate and renews it.

Invariants:
- At most one issuance per identity is in flight; concurrent `get()` calls share it.  At most
  MAX_CONCURRENT_ISSUANCE issuances run at once across identities (ztunnel: 8 concurrent CSRs).
- Contexts are built once per issuance.  Renewal swaps the cached WorkloadCertificate; existing
  SSL.Connections keep the context they were made from, new handshakes get the new one.
- A failed renewal keeps the old certificate while it is valid (state stays Available); retries
  back off exponentially from INITIAL_BACKOFF to MAX_BACKOFF and reset after a success.
- `get()` never waits through a backoff: with no valid certificate and no issuance in flight it
  raises IdentityError("... Unavailable: <error>") at once, so connections fail fast.
- States, as ztunnel's config_dump shows them: "Initializing", "Available", "Unavailable: <error>".
- Validity is judged with the injected `clock` (epoch seconds); sleeps use the event loop's clock.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from ..errors import IdentityError
from ..tls.context import client_context, server_context
from .ca import CertificateSource, IssuedCertificate
from .spiffe import Identity

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.5  # seconds; ztunnel's first retry delay
MAX_BACKOFF = 150.0  # seconds; ztunnel's cap
MIN_REFRESH_DELAY = INITIAL_BACKOFF  # never renew in a tight loop, even for a cert already past half-life
MAX_CONCURRENT_ISSUANCE = 8  # ztunnel's SecretManagerConfig.concurrency

INITIALIZING = "Initializing"
AVAILABLE = "Available"
UNAVAILABLE = "Unavailable"


def backoff_delay(failures: int) -> float:
    """Seconds to wait after the `failures`-th consecutive failure (1-based): 0.5, 1, 2, ... 150."""
    if failures < 1:
        return 0.0
    return min(INITIAL_BACKOFF * 2.0 ** min(failures - 1, 64), MAX_BACKOFF)


@dataclass(frozen=True)
class WorkloadCertificate:
    """An issued certificate with the TLS contexts built from it (once, at issuance)."""

    issued: IssuedCertificate
    server_context: SSL.Context
    client_context: SSL.Context

    @classmethod
    def build(cls, issued: IssuedCertificate) -> "WorkloadCertificate":
        return cls(
            issued=issued,
            server_context=server_context(issued, issued.identity.trust_domain),
            client_context=client_context(issued),
        )

    @property
    def identity(self) -> Identity:
        return self.issued.identity

    @property
    def serial(self) -> int:
        return self.issued.serial

    def is_valid(self, now: float) -> bool:
        # Only expiry is judged: a not_before in the future (CA clock ahead) is still the best we
        # have, and peers decide for themselves.
        return now < self.issued.not_after.timestamp()


class _Entry:
    __slots__ = ("identity", "cert", "error", "failures", "ready", "task")

    def __init__(self, identity: Identity):
        self.identity = identity
        self.cert: WorkloadCertificate | None = None
        self.error: str | None = None  # last failure, cleared by a success
        self.failures = 0  # consecutive
        self.ready: asyncio.Future | None = None  # resolved (None) when an issuance attempt ends
        self.task: asyncio.Task | None = None


class CertificateManager:
    def __init__(
        self,
        source: CertificateSource,
        ttl: float,
        *,
        clock: Callable[[], float] = time.time,
        loop: asyncio.AbstractEventLoop | None = None,
        concurrency: int = MAX_CONCURRENT_ISSUANCE,
    ):
        self._source = source
        self._ttl = ttl
        self._clock = clock
        self._loop = loop
        self._limit = asyncio.Semaphore(concurrency)
        self._entries: dict[Identity, _Entry] = {}
        self._stopping: set[asyncio.Task] = set()
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    async def get(self, identity: Identity) -> WorkloadCertificate:
        """The current certificate of `identity`, issuing it first if needed."""
        if self._closed:
            raise IdentityError(f"no certificate for {identity}: certificate manager is closed")
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._start(identity)
        cert = self._valid(entry)
        if cert is not None:
            return cert
        if entry.ready is not None and not entry.ready.done():
            # shield: one caller giving up must not cancel the issuance the others wait for
            await asyncio.shield(entry.ready)
            cert = self._valid(entry)
            if cert is not None:
                return cert
        raise IdentityError(f"no certificate for {identity}: {self._state(entry)}")

    def state(self, identity: Identity) -> str | None:
        """The config_dump state of `identity`, or None when it is not managed."""
        entry = self._entries.get(identity)
        return None if entry is None else self._state(entry)

    def forget(self, identity: Identity) -> None:
        """Stop managing `identity` (its last workload left); live connections are unaffected."""
        entry = self._entries.pop(identity, None)
        if entry is None:
            return
        entry.error = "forgotten"
        self._stop(entry)

    def snapshot(self) -> list[dict]:
        """Certificates for the admin config_dump, in ztunnel's shape, sorted by identity."""
        out = []
        for entry in sorted(self._entries.values(), key=lambda e: str(e.identity)):
            cert = entry.cert
            out.append({
                "identity": str(entry.identity),
                "state": self._state(entry),
                "certChain": [_dump(x509.load_pem_x509_certificate(pem)) for pem in cert.issued.chain_pem]
                if cert else [],
                "rootCerts": [_dump(root) for root in x509.load_pem_x509_certificates(cert.issued.root_pem)]
                if cert else [],
            })
        return out

    async def close(self) -> None:
        """Cancel every renewal timer; pending `get()` calls fail."""
        self._closed = True
        for entry in list(self._entries.values()):
            entry.error = "certificate manager is closed"
            self._stop(entry)
        self._entries.clear()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------

    def _start(self, identity: Identity) -> _Entry:
        loop = self._loop or asyncio.get_running_loop()
        entry = _Entry(identity)
        entry.ready = loop.create_future()
        entry.task = loop.create_task(self._run(entry), name=f"cert-manager {identity}")
        self._entries[identity] = entry
        return entry

    def _stop(self, entry: _Entry) -> None:
        task = entry.task
        if task is not None and not task.done():
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        _wake(entry)

    def _valid(self, entry: _Entry) -> WorkloadCertificate | None:
        cert = entry.cert
        return cert if cert is not None and cert.is_valid(self._clock()) else None

    def _state(self, entry: _Entry) -> str:
        if self._valid(entry) is not None:
            return AVAILABLE
        if entry.error is not None:
            return f"{UNAVAILABLE}: {entry.error}"
        if entry.cert is not None:
            return f"{UNAVAILABLE}: certificate expired"
        return INITIALIZING

    async def _run(self, entry: _Entry) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._valid(entry) is None and (entry.ready is None or entry.ready.done()):
                entry.ready = loop.create_future()  # callers arriving now wait for this attempt
            try:
                cert = await self._issue(entry.identity)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any CA failure is retried with backoff
                entry.failures += 1
                entry.error = str(exc) or type(exc).__name__
                delay = backoff_delay(entry.failures)
                log.warning(
                    "failed to fetch certificate, retrying in %gs", delay,
                    extra={"fields": {"identity": str(entry.identity), "error": entry.error,
                                      "attempt": entry.failures,
                                      "keeping_old": self._valid(entry) is not None}},
                )
            else:
                entry.cert, entry.error, entry.failures = cert, None, 0
                delay = max(cert.issued.refresh_at.timestamp() - self._clock(), MIN_REFRESH_DELAY)
                log.debug(
                    "certificate issued",
                    extra={"fields": {"identity": str(entry.identity), "serial": f"{cert.serial:x}",
                                      "expires": _rfc3339(cert.issued.not_after),
                                      "refresh_in": f"{delay:.1f}s"}},
                )
            _wake(entry)
            await asyncio.sleep(delay)

    async def _issue(self, identity: Identity) -> WorkloadCertificate:
        async with self._limit:
            issued = self._source.issue(identity, self._ttl)
            if inspect.isawaitable(issued):
                issued = await issued
        if issued.identity != identity:
            raise IdentityError(f"CA returned a certificate for {issued.identity}, asked for {identity}")
        return WorkloadCertificate.build(issued)


def _wake(entry: _Entry) -> None:
    if entry.ready is not None and not entry.ready.done():
        entry.ready.set_result(None)


def _rfc3339(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dump(cert: x509.Certificate) -> dict:
    return {
        "pem": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        # Decimal, as ztunnel's config_dump has it (BigUint to_string) and istioctl parses it.
        "serialNumber": str(cert.serial_number),
        "validFrom": _rfc3339(cert.not_valid_before_utc),
        "expirationTime": _rfc3339(cert.not_valid_after_utc),
    }
