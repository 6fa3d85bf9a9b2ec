"""istio.workload.Address and istio.security.Authorization <-> the state models, both ways, pure.

Role: what istiod sends over xDS becomes the same Workload / Service / Authorization objects the
local config file produces (so every decision, log and config_dump line is the same whatever the
source), and the fake istiod turns those models back into Istio's messages.

Invariants:
- `*_from_proto` either returns a complete model or raises Rejected(name, reason) naming the xDS
  resource and what is wrong; the reason becomes part of the NACK's error_detail.message.
- ztunnel's defaults apply on the way in: empty trust_domain -> cluster.local, empty
  service_account -> default, capacity absent -> 1 (reference 4.2); an empty cluster_id gets the
  local config's default ("Kubernetes") so both sources label metrics alike.
- ztunnel's refusals apply too: an IP that is not 4 or 16 bytes, the LEGACY_ISTIO_MTLS tunnel
  protocol, an enum value this build does not know, a workload without uid, a resource whose name
  is not its key (workload = uid, service = "<namespace>/<hostname>", policy = "<namespace>/<name>"),
  because a removal by name would then miss it.
- Key checks ("ns/hostname", SPIFFE SANs) are the local parser's (xds/local.py), so both sources
  accept and refuse the same things.
- `*_to_proto(from_proto(x))` keeps every field the models hold.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_network
from types import MappingProxyType

from google.protobuf import empty_pb2, wrappers_pb2

from ..identity.spiffe import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN
from ..protos import authorization_pb2 as apb
from ..protos import workload_pb2 as wpb
from ..state.policy import (
    Action,
    Authorization,
    IpNetwork,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ..state.service import NetworkAddress, Service
from ..state.store import canonical_ip
from ..state.workload import (
    ApplicationTunnel,
    ApplicationTunnelProtocol,
    GatewayAddress,
    IpAddress,
    Locality,
    TunnelProtocol,
    WeightedWaypoint,
    Workload,
    WorkloadStatus,
)
from .local import _MAX_PORT, _namespaced, _Refusal, _spiffe_id

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"

DEFAULT_CLUSTER_ID = "Kubernetes"  # the local parser's default for clusterId
DEFAULT_HBONE_MTLS_PORT = 15008  # a GatewayAddress without a port means the HBONE port

_TUNNEL = {wpb.NONE: TunnelProtocol.TCP, wpb.HBONE: TunnelProtocol.HBONE}
_WORKLOAD_TYPE = {wpb.DEPLOYMENT: "deployment", wpb.CRONJOB: "cronjob", wpb.POD: "pod", wpb.JOB: "job"}
_APP_TUNNEL = {wpb.ApplicationTunnel.NONE: ApplicationTunnelProtocol.NONE,
               wpb.ApplicationTunnel.PROXY: ApplicationTunnelProtocol.PROXY}
_STATUS = {wpb.HEALTHY: WorkloadStatus.HEALTHY, wpb.UNHEALTHY: WorkloadStatus.UNHEALTHY}
_SCOPE = {apb.GLOBAL: Scope.GLOBAL, apb.NAMESPACE: Scope.NAMESPACE, apb.WORKLOAD_SELECTOR: Scope.WORKLOAD_SELECTOR}
_ACTION = {apb.ALLOW: Action.ALLOW, apb.DENY: Action.DENY}
_STRING_MATCH_FIELDS = ("namespaces", "not_namespaces", "principals", "not_principals")
_SA_MATCH_FIELDS = ("service_accounts", "not_service_accounts")
_CIDR_MATCH_FIELDS = ("source_ips", "not_source_ips", "destination_ips", "not_destination_ips")
_PORT_MATCH_FIELDS = ("destination_ports", "not_destination_ports")


class Rejected(Exception):
    """A resource that fails validation; str() is "<name>: <reason>" (one NACK entry)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _refused(name: str, refusal: _Refusal) -> Rejected:
    return Rejected(name, f"{refusal.path}: {refusal.reason}" if refusal.path else refusal.reason)


def _enum(table: dict, value: int, enum_type, path: str):
    if value in table:
        return table[value]
    known = enum_type.DESCRIPTOR.values_by_number.get(value)
    what = known.name if known is not None else str(value)
    raise _Refusal(path, f"unsupported {enum_type.DESCRIPTOR.name} {what}")


# --- istio.workload.Address -> models -----------------------------------------------------------


def address_from_proto(name: str, address: wpb.Address) -> Workload | Service:
    """The model for one Address resource named `name`; raises Rejected."""
    try:
        kind = address.WhichOneof("type")
        if kind == "workload":
            workload = _workload(address.workload)
            if workload.uid != name:
                raise _Refusal("workload.uid", f"{workload.uid!r} differs from the resource name")
            return workload
        if kind == "service":
            service = _service(address.service)
            if service.key != name:
                raise _Refusal("service", f"namespace/hostname {service.key!r} differs from the resource name")
            return service
        raise _Refusal("", "Address holds neither a workload nor a service")
    except _Refusal as r:
        raise _refused(name, r) from None


def _ip(raw: bytes, path: str) -> IpAddress:
    if len(raw) == 4:
        return IPv4Address(raw)
    if len(raw) == 16:
        return canonical_ip(IPv6Address(raw))
    raise _Refusal(path, f"invalid IP address: {len(raw)} bytes (expected 4 or 16)")


def _port(value: int, path: str, low: int, what: str) -> int:
    if not low <= value <= _MAX_PORT:
        raise _Refusal(path, f"{what} {value} out of range; accepted: {low}..{_MAX_PORT}")
    return value


def _ports(ports, path: str) -> MappingProxyType:
    out: dict[int, int] = {}
    for i, p in enumerate(ports):
        where = f"{path}[{i}]"
        service_port = _port(p.service_port, f"{where}.service_port", 1, "service port")
        if service_port in out:
            raise _Refusal(where, f"service port {service_port} listed twice")
        out[service_port] = _port(p.target_port, f"{where}.target_port", 0, "target port")
    return MappingProxyType(out)


def _gateway(g: wpb.GatewayAddress, path: str) -> GatewayAddress | None:
    kind = g.WhichOneof("destination")
    port = g.hbone_mtls_port or DEFAULT_HBONE_MTLS_PORT
    if kind == "address":
        return GatewayAddress(network=g.address.network, address=_ip(g.address.address, f"{path}.address.address"),
                              hbone_mtls_port=port)
    if kind == "hostname":
        return GatewayAddress(namespace=g.hostname.namespace, hostname=g.hostname.hostname, hbone_mtls_port=port)
    raise _Refusal(path, "gateway address has neither an address nor a hostname")


def _workload(w: wpb.Workload) -> Workload:
    if not w.uid:
        raise _Refusal("workload.uid", "missing uid")
    protocol = _enum(_TUNNEL, w.tunnel_protocol, wpb.TunnelProtocol, "workload.tunnel_protocol")
    services = {}
    for key in sorted(w.services):
        where = f"workload.services[{key}]"
        services[_namespaced(key, where, "hostname")] = _ports(w.services[key].ports, where)
    return Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        workload_ips=tuple(_ip(a, f"workload.addresses[{i}]") for i, a in enumerate(w.addresses)),
        protocol=protocol,
        trust_domain=w.trust_domain or DEFAULT_TRUST_DOMAIN,
        service_account=w.service_account or DEFAULT_SERVICE_ACCOUNT,
        network=w.network,
        node=w.node,
        cluster_id=w.cluster_id or DEFAULT_CLUSTER_ID,
        workload_name=w.workload_name,
        workload_type=_enum(_WORKLOAD_TYPE, w.workload_type, wpb.WorkloadType, "workload.workload_type"),
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        status=_enum(_STATUS, w.status, wpb.WorkloadStatus, "workload.status"),
        locality=Locality(w.locality.region, w.locality.zone, w.locality.subzone),
        services=MappingProxyType(services),
        authorization_policies=tuple(
            _namespaced(p, f"workload.authorization_policies[{i}]", "policy name")
            for i, p in enumerate(w.authorization_policies)),
        capacity=w.capacity.value if w.HasField("capacity") else 1,
        waypoint=_gateway(w.waypoint, "workload.waypoint") if w.HasField("waypoint") else None,
        application_tunnel=_application_tunnel(w.application_tunnel) if w.HasField("application_tunnel") else None,
    )


def _application_tunnel(t: wpb.ApplicationTunnel) -> ApplicationTunnel:
    protocol = _enum(_APP_TUNNEL, t.protocol, wpb.ApplicationTunnel.Protocol, "workload.application_tunnel.protocol")
    return ApplicationTunnel(protocol, _port(t.port, "workload.application_tunnel.port", 0, "port"))


def _service(s: wpb.Service) -> Service:
    if not s.namespace or not s.hostname:
        raise _Refusal("service", "namespace and hostname are required")
    vips = []
    for i, a in enumerate(s.addresses):
        ip = _ip(a.address, f"service.addresses[{i}].address")
        # A CIDR VIP (length shorter than the address) is a range this build cannot route yet:
        # it is left out rather than treated as one address.
        if a.HasField("length") and a.length != ip.max_prefixlen:
            continue
        vips.append(NetworkAddress(a.network, ip))
    return Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        vips=tuple(vips),
        ports=_ports(s.ports, "service.ports"),
        subject_alt_names=tuple(_spiffe_id(san, f"service.subject_alt_names[{i}]")
                                for i, san in enumerate(s.subject_alt_names)),
        canonical=s.canonical,
        waypoint=_gateway(s.waypoint, "service.waypoint") if s.HasField("waypoint") else None,
        weighted_waypoints=tuple(
            WeightedWaypoint(_gateway(ww.destination, f"service.weighted_waypoints[{i}].destination"), ww.weight)
            for i, ww in enumerate(s.weighted_waypoints)),
    )


# --- istio.security.Authorization -> model ------------------------------------------------------


def authorization_from_proto(name: str, p: apb.Authorization) -> Authorization:
    """The model for one Authorization resource named `name`; raises Rejected."""
    try:
        policy = Authorization(
            name=p.name,
            namespace=p.namespace,
            scope=_enum(_SCOPE, p.scope, apb.Scope, "scope"),
            action=_enum(_ACTION, p.action, apb.Action, "action"),
            rules=tuple(
                tuple(tuple(_match(m, f"rules[{i}].clauses[{j}].matches[{k}]") for k, m in enumerate(c.matches))
                      for j, c in enumerate(r.clauses))
                for i, r in enumerate(p.rules)),
            dry_run=p.dry_run,
        )
        if not p.name:
            raise _Refusal("name", "missing name")
        if policy.key != name:
            raise _Refusal("", f"namespace/name {policy.key!r} differs from the resource name")
        return policy
    except _Refusal as r:
        raise _refused(name, r) from None


def _match(m: apb.Match, path: str) -> Match:
    fields: dict[str, tuple] = {}
    for f in _STRING_MATCH_FIELDS:
        fields[f] = tuple(_string_match(v, f"{path}.{f}[{i}]") for i, v in enumerate(getattr(m, f)))
    for f in _SA_MATCH_FIELDS:
        fields[f] = tuple(ServiceAccountMatch(v.namespace, v.serviceAccount) for v in getattr(m, f))
    for f in _CIDR_MATCH_FIELDS:
        fields[f] = tuple(_cidr(v, f"{path}.{f}[{i}]") for i, v in enumerate(getattr(m, f)))
    for f in _PORT_MATCH_FIELDS:
        fields[f] = tuple(_port(v, f"{path}.{f}[{i}]", 1, "port") for i, v in enumerate(getattr(m, f)))
    return Match(**fields)


def _string_match(s: apb.StringMatch, path: str) -> StringMatch:
    kind = s.WhichOneof("match_type")
    if kind == "exact":
        return StringMatch(StringMatchKind.EXACT, s.exact)
    if kind == "prefix":
        return StringMatch(StringMatchKind.PREFIX, s.prefix)
    if kind == "suffix":
        return StringMatch(StringMatchKind.SUFFIX, s.suffix)
    if kind == "presence":
        return StringMatch(StringMatchKind.PRESENCE)
    raise _Refusal(path, "string match has no exact, prefix, suffix or presence")


def _cidr(a: apb.Address, path: str) -> IpNetwork:
    ip = _ip(a.address, f"{path}.address")
    if a.length > ip.max_prefixlen:
        raise _Refusal(f"{path}.length", f"prefix length {a.length} out of range; accepted: 0..{ip.max_prefixlen}")
    return ip_network(f"{ip}/{a.length}", strict=False)


# --- models -> Istio's messages (the fake istiod, round-trip tests) -------------------------------


def _raw(ip: IpAddress) -> bytes:
    return ip.packed


def _gateway_proto(g: GatewayAddress) -> wpb.GatewayAddress:
    if g.address is not None:
        return wpb.GatewayAddress(address=wpb.NetworkAddress(network=g.network, address=_raw(g.address)),
                                  hbone_mtls_port=g.hbone_mtls_port)
    return wpb.GatewayAddress(hostname=wpb.NamespacedHostname(namespace=g.namespace, hostname=g.hostname),
                              hbone_mtls_port=g.hbone_mtls_port)


def _ports_proto(ports) -> list[wpb.Port]:
    return [wpb.Port(service_port=s, target_port=t) for s, t in ports.items()]


def _reverse(table: dict) -> dict:
    return {v: k for k, v in table.items()}


def workload_to_proto(w: Workload) -> wpb.Address:
    msg = wpb.Workload(
        uid=w.uid, name=w.name, namespace=w.namespace,
        addresses=[_raw(ip) for ip in w.workload_ips],
        network=w.network,
        tunnel_protocol=_reverse(_TUNNEL)[w.protocol],
        trust_domain=w.trust_domain, service_account=w.service_account,
        node=w.node, canonical_name=w.canonical_name, canonical_revision=w.canonical_revision,
        workload_type=_reverse(_WORKLOAD_TYPE)[w.workload_type], workload_name=w.workload_name,
        authorization_policies=list(w.authorization_policies),
        status=_reverse(_STATUS)[w.status], cluster_id=w.cluster_id,
        locality=wpb.Locality(region=w.locality.region, zone=w.locality.zone, subzone=w.locality.subzone),
        capacity=wrappers_pb2.UInt32Value(value=w.capacity),
    )
    for key, ports in w.services.items():
        msg.services[key].ports.extend(_ports_proto(ports))
    if w.waypoint is not None:
        msg.waypoint.CopyFrom(_gateway_proto(w.waypoint))
    if w.application_tunnel is not None:
        msg.application_tunnel.CopyFrom(wpb.ApplicationTunnel(
            protocol=_reverse(_APP_TUNNEL)[w.application_tunnel.protocol], port=w.application_tunnel.port))
    return wpb.Address(workload=msg)


def service_to_proto(s: Service) -> wpb.Address:
    msg = wpb.Service(
        name=s.name, namespace=s.namespace, hostname=s.hostname,
        addresses=[wpb.NetworkAddress(network=v.network, address=_raw(v.address)) for v in s.vips],
        ports=_ports_proto(s.ports), subject_alt_names=list(s.subject_alt_names), canonical=s.canonical,
    )
    if s.waypoint is not None:
        msg.waypoint.CopyFrom(_gateway_proto(s.waypoint))
    msg.weighted_waypoints.extend(wpb.WeightedWaypoint(destination=_gateway_proto(ww.destination), weight=ww.weight)
                                  for ww in s.weighted_waypoints)
    return wpb.Address(service=msg)


def _string_match_proto(m: StringMatch) -> apb.StringMatch:
    if m.kind is StringMatchKind.PRESENCE:
        return apb.StringMatch(presence=empty_pb2.Empty())
    return apb.StringMatch(**{m.kind.name.lower(): m.value})


def _match_proto(m: Match) -> apb.Match:
    out = apb.Match()
    for f in _STRING_MATCH_FIELDS:
        getattr(out, f).extend(_string_match_proto(v) for v in getattr(m, f))
    for f in _SA_MATCH_FIELDS:
        getattr(out, f).extend(apb.ServiceAccountMatch(namespace=v.namespace, serviceAccount=v.service_account)
                               for v in getattr(m, f))
    for f in _CIDR_MATCH_FIELDS:
        getattr(out, f).extend(apb.Address(address=n.network_address.packed, length=n.prefixlen)
                               for n in getattr(m, f))
    for f in _PORT_MATCH_FIELDS:
        getattr(out, f).extend(getattr(m, f))
    return out


def authorization_to_proto(p: Authorization) -> apb.Authorization:
    return apb.Authorization(
        name=p.name, namespace=p.namespace,
        scope=_reverse(_SCOPE)[p.scope], action=_reverse(_ACTION)[p.action],
        rules=[apb.Rule(clauses=[apb.Clause(matches=[_match_proto(m) for m in clause]) for clause in rule])
               for rule in p.rules],
        dry_run=p.dry_run,
    )
