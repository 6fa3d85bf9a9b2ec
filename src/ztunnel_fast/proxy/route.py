"""The outbound routing decision, as a pure function of state and the connection's addresses.

Given where a captured connection was going, decide how ztunnel-fast carries it (reference 9):
- a mesh (HBONE) workload: HBONE to <pod IP>:15008 with :authority <pod IP>:<target port>;
- a non-mesh workload: plain TCP to <pod IP>:<target port>;
- a service VIP: pick an endpoint by round robin, translate service port -> target port, then
  as above; a known service with no usable endpoint is refused ("no healthy upstream");
- anything else: passthrough, plain TCP to the original destination;
- the node-local fast path (option): a mesh workload on this node, served by this same
  ztunnel-fast, is reached directly without TLS;
- never one of ztunnel-fast's own ports (15001/15006/15008) on loopback or on the source itself.

The only state that changes is the round-robin position inside `lb`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..config import INBOUND_PORT, SELF_PORTS
from ..identity.spiffe import Identity
from ..state.service import Service
from ..state.store import ProxyState, RoundRobin
from ..state.workload import IpAddress, TunnelProtocol, Workload


class Kind(enum.Enum):
    HBONE = "HBONE"
    TCP = "TCP"  # plain TCP to a workload that is not in the mesh
    PASSTHROUGH = "Passthrough"  # plain TCP to an address ztunnel-fast knows nothing about
    NODE_LOCAL = "NodeLocal"  # same-node mesh workload, no TLS (the guide's fast path)
    REFUSE = "Refuse"


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


def _addr(ip: IpAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def decide(
    state: ProxyState,
    lb: RoundRobin,
    *,
    source: Workload | None,
    dst_ip: IpAddress,
    dst_port: int,
    network: str = "",
    fast_path_node: str | None = None,
) -> Route:
    """Decide how to carry one outbound connection.

    `fast_path_node` is this ztunnel-fast's node when the node-local fast path is enabled and
    it serves every workload of the node (shared mode); None disables the fast path.
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
        picked = lb.pick(state, service, dst_port)
        if picked is None:
            return Route(Kind.REFUSE, service=service, reason=f"no healthy upstream for {service.hostname}:{dst_port}")
        workload, port = picked

    ip = _workload_ip(workload, dst_ip if service is None else None)
    if port in SELF_PORTS and source is not None and workload.uid == source.uid:
        return Route(Kind.REFUSE, workload=workload, reason=f"self call: refusing to connect to ztunnel's own port {port}")
    target = (ip, port)

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
