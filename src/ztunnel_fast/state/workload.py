"""Workloads as ztunnel models them (istio.workload.Workload, local-config camelCase names).

Invariants: a Workload is immutable; `workload_ips` holds ip_address objects (never strings);
`services` maps "namespace/hostname" to {service port: target port}.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType
from typing import Mapping

from ..identity.spiffe import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, Identity

IpAddress = IPv4Address | IPv6Address


class TunnelProtocol(enum.Enum):
    TCP = "TCP"  # not in the mesh: plain TCP (wire name NONE)
    HBONE = "HBONE"


class WorkloadStatus(enum.Enum):
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint (or network gateway) is: an address on a network, or a service by
    namespace/hostname, as istiod sends it; proxy/route.py resolves it to a workload per connection."""

    network: str = ""
    address: "IpAddress | None" = None  # set for an address destination
    namespace: str = ""  # set with hostname for a service destination
    hostname: str = ""
    hbone_mtls_port: int = 15008  # HBONE port of the waypoint

    @property
    def destination(self) -> str:
        """"<network>/<ip>" or "<namespace>/<hostname>" (the local-config and config_dump form)."""
        if self.address is not None:
            return f"{self.network}/{self.address}"
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class WeightedWaypoint:
    """One entry of a service's `weighted_waypoints`: a waypoint and its relative weight (a weight
    of 0 is never picked)."""

    destination: GatewayAddress
    weight: int = 1


class ApplicationTunnelProtocol(enum.Enum):
    NONE = "NONE"  # deliver the tunnelled bytes as they are
    PROXY = "PROXY"  # prefix them with a PROXY protocol v2 header (the waypoint "sandwich")


@dataclass(frozen=True, slots=True)
class ApplicationTunnel:
    """How inbound tunnels reach this workload's app: with `PROXY`, on `port` (0 = the CONNECT's
    port) behind a PROXY v2 header carrying the original addresses and the source identity."""

    protocol: ApplicationTunnelProtocol = ApplicationTunnelProtocol.NONE
    port: int = 0


def _frozen(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True, slots=True)
class Workload:
    uid: str
    name: str
    namespace: str
    workload_ips: tuple[IpAddress, ...] = ()
    protocol: TunnelProtocol = TunnelProtocol.TCP
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    network: str = ""
    node: str = ""
    cluster_id: str = "Kubernetes"
    workload_name: str = ""
    workload_type: str = "deployment"
    canonical_name: str = ""
    canonical_revision: str = ""
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    locality: Locality = field(default_factory=Locality)
    # "namespace/hostname" -> {service port: target port}
    services: Mapping[str, Mapping[int, int]] = field(default_factory=lambda: _frozen({}))
    authorization_policies: tuple[str, ...] = ()
    capacity: int = 1
    waypoint: GatewayAddress | None = None
    application_tunnel: ApplicationTunnel | None = None

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.namespace, self.service_account)
