"""ProxyState: one immutable snapshot of workloads, services and policies, with pure lookups.

Role: the routing decision asks this module "who is at this IP", "which service owns this VIP",
"which endpoints does this service have".  A new configuration produces a new ProxyState; nobody
edits one in place, so a decision always sees a consistent snapshot.

Invariants:
- Indexes are built once in the constructor and never change; lookups are dict reads.
- Indexes are unambiguous: two workloads on one (network, IP), two workloads with one uid, two
  services on one (network, VIP) or with one "namespace/hostname" key raise ValueError.  (The
  local config parser refuses those earlier with user-facing errors; this guards other sources.)
- IPs are stored and looked up in canonical form: IPv4-mapped IPv6 (::ffff:a.b.c.d), which dual
  stack sockets report for IPv4 peers, is the IPv4 address.
- Endpoints of a service come from workloads' `services` maps, in workload config order.
- RoundRobin is the only mutable object here: it holds one counter per service and is meant for
  the single control thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Iterable, Mapping

from .policy import Authorization
from .service import Service
from .workload import IpAddress, Workload, WorkloadStatus

if TYPE_CHECKING:  # the parser imports canonical_ip from here; avoid the import cycle
    from ..xds.local import LocalConfig


def canonical_ip(ip: str | IpAddress) -> IpAddress:
    """The ip_address for `ip`, with IPv4-mapped IPv6 folded to IPv4.

    Raises ValueError for a string that is no IP address (a caller bug: sockets give valid ones).
    """
    addr = ip if isinstance(ip, (IPv4Address, IPv6Address)) else ip_address(ip)
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class Endpoint:
    workload: Workload
    # The workload's own {service port: target port} for this service (may be empty).
    ports: Mapping[int, int]


class ProxyState:
    __slots__ = ("_workloads", "_services", "_policies", "_by_ip", "_by_uid", "_by_vip",
                 "_by_key", "_endpoints", "_by_node")

    def __init__(
        self,
        workloads: Iterable[Workload] = (),
        services: Iterable[Service] = (),
        policies: Iterable[Authorization] = (),
    ):
        self._workloads = tuple(workloads)
        self._services = tuple(services)
        self._policies = tuple(policies)

        self._by_uid: dict[str, Workload] = {}
        self._by_ip: dict[tuple[str, IpAddress], Workload] = {}
        by_node: dict[str, list[Workload]] = {}
        endpoints: dict[str, list[Endpoint]] = {}
        for w in self._workloads:
            if w.uid in self._by_uid:
                raise ValueError(f"duplicate workload uid {w.uid!r}")
            self._by_uid[w.uid] = w
            for ip in w.workload_ips:
                key = (w.network, canonical_ip(ip))
                other = self._by_ip.get(key)
                if other is not None and other is not w:
                    raise ValueError(f"{key[1]} on network {w.network!r}: workloads "
                                     f"{other.uid!r} and {w.uid!r}")
                self._by_ip[key] = w
            by_node.setdefault(w.node, []).append(w)
            for service_key, ports in w.services.items():
                endpoints.setdefault(service_key, []).append(Endpoint(w, ports))

        self._by_key: dict[str, Service] = {}
        self._by_vip: dict[tuple[str, IpAddress], Service] = {}
        for s in self._services:
            if s.key in self._by_key:
                raise ValueError(f"duplicate service {s.key!r}")
            self._by_key[s.key] = s
            for vip in s.vips:
                key = (vip.network, canonical_ip(vip.address))
                if key in self._by_vip:
                    raise ValueError(f"VIP {vip} on services {self._by_vip[key].key!r} and {s.key!r}")
                self._by_vip[key] = s

        self._by_node = {node: tuple(ws) for node, ws in by_node.items()}
        self._endpoints = {key: tuple(eps) for key, eps in endpoints.items()}

    @classmethod
    def from_local(cls, cfg: "LocalConfig") -> "ProxyState":
        return cls(cfg.workloads, cfg.services, cfg.policies)

    def workload_by_ip(self, ip: str | IpAddress, network: str = "") -> Workload | None:
        return self._by_ip.get((network, canonical_ip(ip)))

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._by_uid.get(uid)

    def service_by_vip(self, ip: str | IpAddress, network: str = "") -> Service | None:
        return self._by_vip.get((network, canonical_ip(ip)))

    def service_by_key(self, key: str) -> Service | None:
        """`key` is "namespace/hostname" (Service.key)."""
        return self._by_key.get(key)

    def endpoints(self, service: Service) -> tuple[Endpoint, ...]:
        """Every workload naming this service, healthy or not; selection filters."""
        return self._endpoints.get(service.key, ())

    def workloads(self) -> tuple[Workload, ...]:
        return self._workloads

    def services(self) -> tuple[Service, ...]:
        return self._services

    def policies(self) -> tuple[Authorization, ...]:
        return self._policies

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        return self._by_node.get(node, ())


def target_port(service: Service, endpoint: Endpoint, service_port: int) -> int | None:
    """The port to dial on `endpoint` for a connection to `service_port` of `service`.

    None when the service does not expose `service_port`: an endpoint's own map cannot add ports
    to a service.  The endpoint's map wins over the service's (per-pod target ports); a target of
    0 means "same as the service port".
    """
    if service_port not in service.ports:
        return None
    port = endpoint.ports.get(service_port)
    if port is None:
        port = service.ports[service_port]
    return port or service_port


class RoundRobin:
    """Client-side L4 round robin per service (the user guide: a fixed L4 round robin, not random).

    One counter per service key; each pick advances it and takes the next candidate modulo the
    current candidate count, so a changed candidate set never stalls the rotation.  Not thread
    safe: the control thread owns it.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def pick(self, state: ProxyState, service: Service, service_port: int) -> tuple[Workload, int] | None:
        """The next healthy endpoint with an IP that serves `service_port`, and its target port."""
        candidates: list[tuple[Workload, int]] = []
        for ep in state.endpoints(service):
            w = ep.workload
            if w.status is not WorkloadStatus.HEALTHY or not w.workload_ips:
                continue
            port = target_port(service, ep, service_port)
            if port is not None:
                candidates.append((w, port))
        if not candidates:
            return None
        index = self._next.get(service.key, 0) % len(candidates)
        self._next[service.key] = index + 1
        return candidates[index]
