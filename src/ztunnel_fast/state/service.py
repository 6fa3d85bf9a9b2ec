"""Services (istio.workload.Service): a hostname, VIPs per network and a port map.

Invariant: `ports` maps service port -> target port; a target port of 0 means "same as service
port" as in ztunnel.  Endpoints are not stored here: they come from workloads' `services` maps and
are indexed by the ProxyState.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .workload import GatewayAddress, IpAddress, WeightedWaypoint


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    network: str
    address: IpAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...] = ()
    ports: Mapping[int, int] = field(default_factory=dict)
    subject_alt_names: tuple[str, ...] = ()
    canonical: bool = False
    waypoint: GatewayAddress | None = None
    # sampled per connection by weight; when non-empty it is used instead of `waypoint`
    weighted_waypoints: tuple[WeightedWaypoint, ...] = ()

    @property
    def key(self) -> str:
        """The resource name ztunnel uses for services and workloads' `services` maps."""
        return f"{self.namespace}/{self.hostname}"
