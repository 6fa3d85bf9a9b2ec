"""SPIFFE identities as Istio uses them: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.

Invariant: an Identity always round-trips through str() and Identity.parse(); parse accepts exactly
five path segments after the scheme, as ztunnel does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IdentityError

SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"


@dataclass(frozen=True, slots=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> "Identity":
        if not uri.startswith(SCHEME):
            raise IdentityError(f"not a SPIFFE id: {uri!r}")
        parts = uri[len(SCHEME):].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
            raise IdentityError(f"SPIFFE id must be spiffe://<td>/ns/<ns>/sa/<sa>: {uri!r}")
        return cls(parts[0], parts[2], parts[4])

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy principals use: the id without `spiffe://`."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return SCHEME + self.principal
