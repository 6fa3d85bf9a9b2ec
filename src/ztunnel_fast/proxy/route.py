"""The outbound routing decision, as a pure function of state and the connection's addresses.

Given where a captured connection was going, decide how ztunnel-fast carries it (reference 9):
- a mesh (HBONE) workload: HBONE to <pod IP>:15008 with :authority <pod IP>:<target port>;
- a non-mesh workload: plain TCP to <pod IP>:<target port>;
- a service VIP: pick an endpoint by round robin, translate service port -> target port, then
  as above; a known service with no usable endpoint is refused ("no healthy upstream");
- a service VIP whose service has a waypoint (`waypoint`, or `weightedWaypoints` sampled per
  connection by weight): HBONE to the waypoint's <IP>:<hboneMtlsPort> with :authority the
  original <VIP>:<port> and the waypoint's identities as expected SANs (type ToServiceWaypoint);
- a workload (addressed directly, or picked behind a service without a waypoint) whose workload
  has a waypoint: HBONE to that waypoint with :authority <pod IP>:<port> (type ToWorkloadWaypoint),
  unless the source *is* that waypoint (identity and IP match), which would loop;
- a waypoint that resolves to nothing is refused ("unknown waypoint", no healthy upstream);
- anything else: passthrough, plain TCP to the original destination;
- the node-local fast path (option): a mesh workload on this node, served by this same
  ztunnel-fast, is reached directly without TLS;
- never one of ztunnel-fast's own ports (15001/15006/15008) on loopback or on the source itself.

Waypoints are resolved per connection: an address names a workload (or a service VIP, whose
endpoints are picked), a hostname names a service whose endpoints are picked round robin.  Pool
keys are built from next hop and identities only, so every service behind one waypoint shares the
same pooled connections.

The only state that changes is the round-robin position inside `lb` and the draws from `rng`.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from ..config import INBOUND_PORT, SELF_PORTS
from ..hbone.headers import format_addr
from ..identity.spiffe import Identity
from ..state.service import Service
from ..state.store import ProxyState, RoundRobin
from ..state.workload import (
    GatewayAddress,
    IpAddress,
    TunnelProtocol,
    WeightedWaypoint,
    Workload,
)


class Kind(enum.Enum):
    HBONE = "HBONE"
    TCP = "TCP"  # plain TCP to a workload that is not in the mesh
    PASSTHROUGH = "Passthrough"  # plain TCP to an address ztunnel-fast knows nothing about
    NODE_LOCAL = "NodeLocal"  # same-node mesh workload, no TLS (the guide's fast path)
    REFUSE = "Refuse"


class Via(enum.Enum):
    """The `type` word of ztunnel's `proxy to ... using HBONE via ... type <Via>` line."""

    DIRECT = "Direct"
    SERVICE_WAYPOINT = "ToServiceWaypoint"
    WORKLOAD_WAYPOINT = "ToWorkloadWaypoint"


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    # Where the application's bytes end up: pod IP and target port, or the original destination.
    target: tuple[IpAddress, int] | None = None
    # What we dial: <pod IP>:15008 for HBONE, the target itself for the plain kinds.
    next_hop: tuple[IpAddress, int] | None = None
    # HBONE only: the CONNECT :authority ("<pod IP>:<target port>").
    authority: str | None = None
    # HBONE only: server identities we accept (the workload's, then the service's SANs).
    identities: tuple[Identity, ...] = ()
    # The destination workload, when known.
    workload: Workload | None = None
    # The destination service, when the client addressed a service VIP.
    service: Service | None = None
    # REFUSE only: why, in words that go to the log.
    reason: str | None = None
    # HBONE only: direct to the destination, or through its service's / workload's waypoint.
    via: Via = Via.DIRECT
    # Through a waypoint: the waypoint as configured (the `workload` field is then the waypoint
    # workload that was picked, the one whose identity we expect).
    waypoint: GatewayAddress | None = None


def _addr(ip: IpAddress, port: int) -> str:
    return format_addr(ip, port)  # "[ip]:port" for IPv6; the address text is cached there


def decide(
    state: ProxyState,
    lb: RoundRobin,
    *,
    source: Workload | None,
    dst_ip: IpAddress,
    dst_port: int,
    network: str = "",
    fast_path_node: str | None = None,
    rng: random.Random | None = None,
) -> Route:
    """Decide how to carry one outbound connection.

    `fast_path_node` is this ztunnel-fast's node when the node-local fast path is enabled and
    it serves every workload of the node (shared mode); None disables the fast path.  `rng`
    samples `weightedWaypoints` (the module's generator when None; tests pass a seeded one).
    """
    if dst_port in SELF_PORTS and (dst_ip.is_loopback or (source is not None and dst_ip in source.workload_ips)):
        return Route(Kind.REFUSE, reason=f"self call: refusing to connect to ztunnel's own port {dst_port}")

    service = None
    workload = state.workload_by_ip(dst_ip, network)
    port = dst_port
    if workload is None:
        service = state.service_by_vip(dst_ip, network)
        if service is None:
            target = (dst_ip, dst_port)
            return Route(Kind.PASSTHROUGH, target=target, next_hop=target)
        gateway = service_waypoint(service, rng or random)
        if gateway is not None:
            return _to_waypoint(state, lb, gateway, Via.SERVICE_WAYPOINT, (dst_ip, dst_port), service)
        picked = lb.pick(state, service, dst_port)
        if picked is None:
            return Route(Kind.REFUSE, service=service, reason=f"no healthy upstream for {service.hostname}:{dst_port}")
        workload, port = picked

    ip = _workload_ip(workload, dst_ip if service is None else None)
    if port in SELF_PORTS and source is not None and workload.uid == source.uid:
        return Route(Kind.REFUSE, workload=workload, reason=f"self call: refusing to connect to ztunnel's own port {port}")
    target = (ip, port)

    if workload.waypoint is not None and not from_waypoint(state, workload.waypoint, source):
        return _to_waypoint(state, lb, workload.waypoint, Via.WORKLOAD_WAYPOINT, target, service)

    if workload.protocol is not TunnelProtocol.HBONE:
        return Route(Kind.TCP, target=target, next_hop=target, workload=workload, service=service)

    if fast_path_node is not None and workload.node == fast_path_node:
        return Route(Kind.NODE_LOCAL, target=target, next_hop=target, workload=workload, service=service)

    identities = [workload.identity]
    if service is not None:
        for san in service.subject_alt_names:
            ident = Identity.parse(san)
            if ident not in identities:
                identities.append(ident)
    return Route(
        Kind.HBONE,
        target=target,
        next_hop=(ip, INBOUND_PORT),
        authority=_addr(ip, port),
        identities=tuple(identities),
        workload=workload,
        service=service,
    )


def _workload_ip(workload: Workload, addressed: IpAddress | None) -> IpAddress:
    """The IP to use for a workload: the one the client addressed, else its first of the same family."""
    if addressed is not None and addressed in workload.workload_ips:
        return addressed
    return workload.workload_ips[0]


def service_waypoint(service: Service, rng) -> GatewayAddress | None:
    """The waypoint for one connection to `service`: a weighted draw from `weightedWaypoints` when
    any has a positive weight, else `waypoint` (None when the service has neither)."""
    total = sum(w.weight for w in service.weighted_waypoints)
    if total > 0:
        return _sample(service.weighted_waypoints, rng.randrange(total))
    return service.waypoint


def _sample(entries: tuple[WeightedWaypoint, ...], draw: int) -> GatewayAddress:
    """The entry whose cumulative weight range holds `draw` (0 <= draw < total weight)."""
    for entry in entries:
        if draw < entry.weight:
            return entry.destination
        draw -= entry.weight
    raise ValueError("draw beyond the total weight")


def _waypoint_service(state: ProxyState, gateway: GatewayAddress) -> Service | None:
    if gateway.address is not None:
        return state.service_by_vip(gateway.address, gateway.network)
    return state.service_by_key(f"{gateway.namespace}/{gateway.hostname}")


def waypoint_workloads(state: ProxyState, gateway: GatewayAddress) -> tuple[Workload, ...]:
    """Every workload a waypoint address may resolve to (for loop checks and inbound checks)."""
    if gateway.address is not None:
        w = state.workload_by_ip(gateway.address, gateway.network)
        if w is not None:
            return (w,)
    service = _waypoint_service(state, gateway)
    return tuple(ep.workload for ep in state.endpoints(service)) if service is not None else ()


def from_waypoint(state: ProxyState, gateway: GatewayAddress, source: Workload | None) -> bool:
    """ztunnel's check_from_waypoint: the source is one of the waypoint's workloads (same
    identity and a shared IP), so sending it back to the waypoint would loop."""
    if source is None:
        return False
    ips = set(source.workload_ips)
    return any(w.identity == source.identity and ips.intersection(w.workload_ips)
               for w in waypoint_workloads(state, gateway))


def _to_waypoint(
    state: ProxyState,
    lb: RoundRobin,
    gateway: GatewayAddress,
    via: Via,
    target: tuple[IpAddress, int],
    service: Service | None,
) -> Route:
    """HBONE to the waypoint: next hop <waypoint IP>:<hboneMtlsPort>, :authority the target."""
    waypoint = None
    identities: list[Identity] = []
    if gateway.address is not None:
        waypoint = state.workload_by_ip(gateway.address, gateway.network)
        ip = gateway.address
    if waypoint is None:
        wp_service = _waypoint_service(state, gateway)
        if wp_service is not None:
            waypoint = lb.pick_any(state, wp_service)
        if waypoint is None:
            return Route(Kind.REFUSE, service=service,
                         reason=f"unknown waypoint: {gateway.destination} (no healthy upstream)")
        ip = waypoint.workload_ips[0]
        identities.append(waypoint.identity)
        for san in wp_service.subject_alt_names:
            ident = Identity.parse(san)
            if ident not in identities:
                identities.append(ident)
    else:
        identities.append(waypoint.identity)
    return Route(
        Kind.HBONE,
        target=target,
        next_hop=(ip, gateway.hbone_mtls_port),
        authority=_addr(*target),
        identities=tuple(identities),
        workload=waypoint,
        service=service,
        via=via,
        waypoint=gateway,
    )


def is_waypoint_for(state: ProxyState, local: Workload, ip: IpAddress, network: str = "") -> bool:
    """Inbound `validate_destination`: may a CONNECT that arrived on `local`'s IP name `ip` in its
    :authority?  Yes when `ip` is a workload or a service VIP whose waypoint (or one of whose
    weighted waypoints) resolves to `local`: the waypoint gets traffic addressed to what it fronts."""
    gateways: list[GatewayAddress] = []
    target = state.workload_by_ip(ip, network)
    if target is not None:
        if target.waypoint is not None:
            gateways.append(target.waypoint)
    else:
        service = state.service_by_vip(ip, network)
        if service is not None:
            if service.waypoint is not None:
                gateways.append(service.waypoint)
            gateways.extend(w.destination for w in service.weighted_waypoints)
    return any(w.uid == local.uid for g in gateways for w in waypoint_workloads(state, g))
