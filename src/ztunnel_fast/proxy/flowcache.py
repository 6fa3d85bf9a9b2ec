"""The outbound flow cache's decision, pure: which flows the native engine may carry on its own and
with what entry (the fast path: ZTUNNEL_FAST_PATH, native engine only).

A flow class is (source IP, original destination IP:port).  Its entry is what the event loop's
path (proxy/outbound.py, the reference) would do for every connection of the class, minus the
per-connection fields: the pool key of the HBONE connection, the CONNECT header block around the
`forwarded` and `traceparent` fields (which the worker fills in), and what the access log and
metrics of each connection need.

Invariants:
- Only a decision that is a function of the flow class and the state alone is cached: HBONE
  straight to a workload (no service VIP: its endpoint is picked round robin per connection; no
  waypoint: weighted waypoints are sampled per connection), with a known source workload (or
  dedicated mode), IPv4 both ends.  Everything else (plain TCP, passthrough, refusals) takes the
  event loop's path every time.
- The header block is stateless HPACK (literals without indexing, no Huffman), so a worker can
  prepend and append fields without an encoder whose table could go out of step with the peer.
- The header fields are those of hbone.headers.connect_request, in its order.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpack.hpack import encode_integer

from ..hbone import headers as hbone_headers
from ..hbone.pool import PoolKey
from ..state.workload import IpAddress, Workload
from .route import Kind, Route, Via


@dataclass(frozen=True, slots=True)
class FlowClass:
    """The key: who connects (IPv4 source) and where it meant to go (IPv4 original destination)."""

    src_ip: IpAddress
    dst_ip: IpAddress
    dst_port: int


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
        and flow.src_ip.version == 4
        and flow.dst_ip.version == 4
    )


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
