"""The flow caches' decisions, pure: which flows the native engine may carry on its own and with
what entry (the fast path: ZTUNNEL_FAST_PATH, native engine only).  Outbound first, then inbound.

A flow class is (listener, source IP, original destination IP:port).  The listener is the outbound
listener the workers accepted the connection on: node mode has one; in-pod mode one per pod (in the
pod's network namespace), and the pod, not the source IP, is the source workload there (inpod/
podproxy.PodScope), so the class must name it.  Its entry is what the event loop's
path (proxy/outbound.py, the reference) would do for every connection of the class, minus the
per-connection fields: the pool key of the HBONE connection, the CONNECT header block around the
`forwarded` and `traceparent` fields (which the worker fills in), and what the access log and
metrics of each connection need.

Invariants:
- Only a decision that is a function of the flow class and the state alone is cached: HBONE
  straight to a workload (no service VIP: its endpoint is picked round robin per connection; no
  waypoint: weighted waypoints are sampled per connection), with a known source workload (or
  dedicated mode), both ends of one family (IPv4 or IPv6: dual-stack pods have both; the class's
  addresses are as proxy/sockets normalizes them, IPv4-mapped IPv6 unmapped).  Everything else
  (plain TCP, passthrough, refusals) takes the event loop's path every time.
- The engine keys IPv4 and IPv6 in one table: `addr16` (IPv6 as it is, IPv4 as ::ffff:a.b.c.d,
  which proxy/sockets.normalize never yields as an IPv6 address), and the worker writes
  `forwarded` as hbone.headers.forwarded does for either family (IPv6 "[addr]:port").
- The header block is stateless HPACK (literals without indexing, no Huffman), so a worker can
  prepend and append fields without an encoder whose table could go out of step with the peer.
- The header fields are those of hbone.headers.connect_request, in its order.

Inbound (a peer's CONNECT on 15008, proxy/inbound.py the reference): the class is (the inbound
HBONE connection, the :authority text).  The connection fixes the peer's address and identity and
the address it arrived on; the :authority the destination; so the authorization's input
(ConnectionInfo) and the destination workload are functions of the class and the state.
- Only an allow verdict without dry-run policies (whose lines are per connection) is cached, for a
  CONNECT to the address the connection arrived on (no waypoint or application-tunnel delivery),
  to a workload without an application tunnel (no PROXY header), IPv4 or IPv6 with the peer, the
  upstream and the dial's spoofed source (if any) of one family, with upstream sockets in our own
  network namespace or (in-pod mode) in the pod's, while the pod's namespace fd is open (`netns`:
  None ours, the fd, or -1 once closed: not cached).  Denials, refusals and everything else take
  the event loop's path every time.
- A pod's entries name its namespace fd, which stays open until they are flushed (the pod's
  removal flushes them before its ack and before closing it: proxy/fastpath_inbound.py).
- What differs per CONNECT within a class (trace id, `forwarded`'s service host) is telemetry
  only; the event loop reads it from each request's own fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpack.hpack import encode_integer

from ..hbone import headers as hbone_headers
from ..hbone.pool import PoolKey
from ..identity.spiffe import Identity
from ..state.rbac import ConnectionInfo, Decision
from ..state.workload import IpAddress, Workload
from .route import Kind, Route, Via


@dataclass(frozen=True, slots=True)
class FlowClass:
    """The key: who connects (source IP, on which listener) and where it meant to go (original
    destination IP:port); IPv4 or IPv6."""

    src_ip: IpAddress
    dst_ip: IpAddress
    dst_port: int
    listener: int = 1  # FastPath's listener id (node mode: 1; in-pod: the pod's)


@dataclass(frozen=True, slots=True)
class FlowEntry:
    """What every connection of a class gets, as the event loop's path would give it."""

    flow: FlowClass
    key: PoolKey  # the HBONE connection's pool key (the fast path keeps its own connection per key)
    route: Route
    source: Workload | None
    prefix: bytes  # HPACK: :method CONNECT, :authority
    fwd_host: bytes  # appended to forwarded's value: ';host=<service>' or empty
    suffix: bytes  # HPACK: the fields after traceparent (baggage)


def literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes(encode_integer(len(n), 7)) + n + bytes(encode_integer(len(v), 7)) + v


def cacheable(route: Route, source: Workload | None, *, dedicated: bool, flow: FlowClass) -> bool:
    return (
        route.kind is Kind.HBONE
        and route.via is Via.DIRECT
        and route.service is None
        and route.waypoint is None
        and route.authority is not None
        and (source is not None or dedicated)
        and flow.src_ip.version == flow.dst_ip.version
    )


def addr16(ip: IpAddress) -> bytes:
    """The engine's flow-table form of an address: 16 bytes, IPv6 as it is, IPv4 IPv4-mapped."""
    return ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed


def flow_entry(flow: FlowClass, route: Route, source: Workload | None, key: PoolKey, *,
               dedicated: bool) -> FlowEntry | None:
    """The entry for a class, or None when its connections must keep taking the event loop's path."""
    if not cacheable(route, source, dedicated=dedicated, flow=flow):
        return None
    # connect_request with placeholders shows which fields come before and after the per-connection ones
    fields = hbone_headers.connect_request(route.authority, client_ip=flow.src_ip, client_port=0,
                                           trace_id="0" * 32, source=source, service_host=None)
    names = [name for name, _ in fields]
    assert names[:4] == [":method", ":authority", hbone_headers.HEADER_FORWARDED, hbone_headers.HEADER_TRACEPARENT], names
    prefix = b"".join(literal(name, value) for name, value in fields[:2])
    suffix = b"".join(literal(name, value) for name, value in fields[4:])
    return FlowEntry(flow, key, route, source, prefix, b"", suffix)


# -- inbound -----------------------------------------------------------------------------------------
AUTHORITY_MAX = 64  # bytes of :authority the native table keys on ("255.255.255.255:65535", "[<IPv6>]:65535" fit)


@dataclass(frozen=True, slots=True)
class InboundClass:
    """The key: the inbound HBONE connection (engine id) and the CONNECT's :authority text."""

    conn_id: int
    authority: str


@dataclass(frozen=True, slots=True)
class InboundEntry:
    """What every CONNECT of a class gets, as proxy/inbound.py would give it."""

    flow: InboundClass
    peer: tuple  # (IP, port) of the peer ztunnel: the access log's src.addr
    peer_id: Identity
    arrived_on: IpAddress  # the local address the connection arrived on
    target: tuple  # (IP, port) the :authority names: the app, dialled as it is
    workload: Workload  # the destination workload
    info: ConnectionInfo  # what the verdict was made on (re-checked on every policy change)
    source: IpAddress | None  # the dial's spoofed source (ORIG_SRC: the peer's IP), None: ours
    netns: int | None = None  # in-pod: the pod's network namespace fd the upstream socket is made in


def inbound_cacheable(flow: InboundClass, *, peer_ip: IpAddress, arrived_on: IpAddress | None,
                      target: tuple, workload: Workload, decision: Decision, source: IpAddress | None,
                      netns: int | None) -> bool:
    """`netns`: where the upstream socket is created: None our own network namespace, else the
    pod's namespace fd (negative once closed: its pod is gone)."""
    ip, _ = target
    return (
        decision.allowed
        and not decision.dry_run
        and arrived_on is not None
        and ip == arrived_on
        and workload.application_tunnel is None
        and (netns is None or netns >= 0)
        and peer_ip.version == ip.version
        and (source is None or source.version == ip.version)
        and flow.authority.isascii()
        and 0 < len(flow.authority) <= AUTHORITY_MAX
    )


def inbound_entry(flow: InboundClass, *, peer: tuple, peer_id: Identity, arrived_on: IpAddress | None,
                  target: tuple, workload: Workload, info: ConnectionInfo, decision: Decision,
                  source: IpAddress | None, netns: int | None) -> InboundEntry | None:
    """The entry for a class, or None when its CONNECTs must keep taking the event loop's path."""
    if not inbound_cacheable(flow, peer_ip=peer[0], arrived_on=arrived_on, target=target, workload=workload,
                             decision=decision, source=source, netns=netns):
        return None
    return InboundEntry(flow, peer, peer_id, arrived_on, target, workload, info, source, netns)
