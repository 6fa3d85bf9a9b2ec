"""The CONNECT exchange of HBONE as pure functions: what a request carries, what a server answers.

Invariants: nothing here touches a socket; every server-side refusal maps to exactly one status
code and one reason string (the same reason is logged and sent), matching ztunnel:
400 bad method / bad authority / ip mismatch, 401 denied by policy, 503 no local workload,
self call or upstream failure.

Per-connection cost: an address's text and a workload's baggage are computed once and kept in
small bounded caches (IP addresses and workload snapshots are immutable, so a cached text never
goes stale); trace and span ids come from a PRNG seeded from the OS (they correlate logs and are no
secret, so no getrandom(2) per connection).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Callable, Iterable, Mapping, Sequence

from ..state.workload import IpAddress, Workload

HEADER_FORWARDED = "forwarded"
HEADER_TRACEPARENT = "traceparent"
HEADER_BAGGAGE = "baggage"
TEXT_CACHE_SIZE = 4096  # entries per cache below; beyond this a cache starts over (bounded memory)

_host_text: dict[IpAddress, str] = {}  # ip -> "ip" or "[ip]" (IPv6): str(IPv4Address) costs a microsecond
_baggage: dict[int, tuple[Workload, str]] = {}  # id(workload) -> (the workload, kept alive; its baggage)
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))  # a child never repeats our ids


def _host(ip: IpAddress) -> str:
    text = _host_text.get(ip)
    if text is None:
        if len(_host_text) >= TEXT_CACHE_SIZE:
            _host_text.clear()
        text = _host_text[ip] = f"[{ip}]" if ip.version == 6 else str(ip)
    return text


def format_addr(ip: IpAddress | str, port: int) -> str:
    """`ip:port`, with IPv6 in brackets as an HTTP authority requires."""
    ip = ip_address(ip) if isinstance(ip, str) else ip
    return f"{_host(ip)}:{port}"


_authorities: dict[str, tuple[IpAddress, int]] = {}  # valid :authority -> (ip, port): they repeat per pod


def parse_authority(authority: str) -> tuple[IpAddress, int]:
    """parse_authority_text, cached for valid authorities (bounded)."""
    parsed = _authorities.get(authority)
    if parsed is None:
        parsed = parse_authority_text(authority)
        if len(_authorities) >= TEXT_CACHE_SIZE:
            _authorities.clear()
        _authorities[authority] = parsed
    return parsed


def parse_authority_text(authority: str) -> tuple[IpAddress, int]:
    """Parse a CONNECT `:authority` of the form ip:port (IPv6 bracketed).

    Raises ValueError for anything else; the server answers that with 400.
    (Hostname authorities are used only by double HBONE through E/W gateways, which this proxy does
    not terminate; traffic through a waypoint keeps the original IP authority.)
    """
    host, sep, port_text = authority.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"no valid authority pseudo header: {authority!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ip = ip_address(host)
        if ip.version != 6:
            raise ValueError(f"no valid authority pseudo header: {authority!r}")
    else:
        ip = ip_address(host)
        if ip.version != 4:
            raise ValueError(f"no valid authority pseudo header: {authority!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"no valid authority pseudo header: {authority!r}")
    return ip, port


def new_trace_id() -> str:
    """A random 32-hex id: the connection id in logs and the traceparent trace id."""
    return "%032x" % _ids.getrandbits(128)


def traceparent(trace_id: str) -> str:
    """W3C traceparent; used only to correlate logs of the two ztunnels."""
    return "00-%s-%016x-00" % (trace_id, _ids.getrandbits(64))


def trace_id_of(value: str | None) -> str | None:
    """The trace id of a traceparent header, or None when absent or malformed."""
    if not value:
        return None
    parts = value.split("-")
    if len(parts) != 4 or len(parts[1]) != 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1]


def forwarded(client_ip: IpAddress | str, client_port: int, service_host: str | None = None) -> str:
    value = f'for="{format_addr(client_ip, client_port)}"'
    return f"{value};host={service_host}" if service_host else value


def baggage(workload: Workload) -> str:
    """Source workload metadata in W3C baggage form; empty entries are omitted (cached per
    workload snapshot)."""
    cached = _baggage.get(id(workload))
    if cached is not None and cached[0] is workload:
        return cached[1]
    if len(_baggage) >= TEXT_CACHE_SIZE:
        _baggage.clear()
    text = _baggage_text(workload)
    _baggage[id(workload)] = (workload, text)
    return text


def _baggage_text(workload: Workload) -> str:
    entries = [
        ("k8s.cluster.name", workload.cluster_id),
        ("k8s.namespace.name", workload.namespace),
        (f"k8s.{workload.workload_type or 'deployment'}.name", workload.workload_name or workload.name),
        ("service.name", workload.canonical_name),
        ("service.version", workload.canonical_revision),
        ("cloud.region", workload.locality.region),
        ("cloud.availability_zone", workload.locality.zone),
    ]
    return ",".join(f"{k}={v}" for k, v in entries if v)


def parse_baggage(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.strip().partition("=")
        if sep and key:
            out[key.strip()] = val.split(";", 1)[0].strip()
    return out


def connect_request(
    authority: str,
    *,
    client_ip: IpAddress | str,
    client_port: int,
    trace_id: str,
    source: Workload | None,
    service_host: str | None = None,
) -> list[tuple[str, str]]:
    """The header block of one CONNECT (RFC 9113 8.5: only :method and :authority pseudo headers)."""
    headers = [
        (":method", "CONNECT"),
        (":authority", authority),
        (HEADER_FORWARDED, forwarded(client_ip, client_port, service_host)),
        (HEADER_TRACEPARENT, traceparent(trace_id)),
    ]
    if source is not None:
        bag = baggage(source)
        if bag:
            headers.append((HEADER_BAGGAGE, bag))
    return headers


@dataclass(frozen=True, slots=True)
class Refusal:
    """A CONNECT the server refuses: the status to send and the reason to log."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectTarget:
    """A CONNECT the server accepts so far: where the upstream dial goes."""

    ip: IpAddress
    port: int
    trace_id: str | None
    forwarded: str = ""  # the request's `forwarded` header (telemetry reads its host=), "" if absent


def check_connect(
    headers: Sequence[tuple[str, str]] | Mapping[str, str],
    *,
    arrived_on: IpAddress | None,
    self_ports: Iterable[int],
    may_differ: Callable[[IpAddress], bool] | None = None,
) -> ConnectTarget | Refusal:
    """Validate one inbound request's headers (steps 1, 2, 4 and the self-call part of 5).

    `arrived_on` is the local IP the TLS connection was accepted on (the destination pod IP), or
    None when the listener does not know it.  `may_differ(ip)` says whether an :authority IP other
    than `arrived_on` is allowed anyway (the local workload is a waypoint for it, or has an
    application tunnel).  Workload lookup and authorization come after this.
    """
    # a list of pairs is what both engines hand over; typing.Mapping's isinstance is the slow path
    if isinstance(headers, (list, tuple)):
        pairs = headers
    else:
        pairs = headers.items() if isinstance(headers, Mapping) else headers
    h = {k.lower(): v for k, v in pairs}
    if h.get(":method") != "CONNECT":
        return Refusal(400, "expected method CONNECT")
    try:
        ip, port = parse_authority(h.get(":authority", ""))
    except ValueError:
        return Refusal(400, "no valid authority pseudo header")
    if arrived_on is not None and ip != arrived_on and not (may_differ is not None and may_differ(ip)):
        return Refusal(400, f"ip mismatch: {ip} != {arrived_on}")
    if port in (self_ports if isinstance(self_ports, (frozenset, set, tuple)) else set(self_ports)):
        return Refusal(503, f"self call: port {port} is one of ztunnel's own ports")
    return ConnectTarget(ip, port, trace_id_of(h.get(HEADER_TRACEPARENT)), h.get(HEADER_FORWARDED, ""))


REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 503: "Service Unavailable"}


def status_text(status: int) -> str:
    return f"{status} {REASONS.get(status, '')}".rstrip()
