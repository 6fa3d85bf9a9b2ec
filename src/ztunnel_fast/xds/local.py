"""ztunnel's local config file (LOCAL_XDS_PATH, or inline LOCAL_XDS): workloads, services, policies.

Role: turn the camelCase YAML that ztunnel reads in local mode (reference section 5.5) into the
state models, so a node can run without istiod.

Invariants:
- All or nothing: a config with any problem is refused whole with one ConfigError naming the
  source, the key path (`workloads[1].workloadIps[0]`, `services[0].ports.70000`) and the reason.
  No partially parsed object ever escapes.
- Strict like ztunnel's `deny_unknown_fields`: unknown keys are refused at every level, and so are
  duplicate YAML keys (PyYAML would silently keep the last one).  Real ztunnel keys we do not
  implement yet (network gateways, load balancing, ...) are refused as "not supported yet" rather than ignored,
  because ignoring them would route traffic differently from what the file says.
- An explicit null counts as an absent key (YAML writes `services:` with nothing under it).
- IPs are canonical (IPv4-mapped IPv6 folded to IPv4), as the state indexes expect.
- Parsing is pure (`parse_local_config`); only `load_local_config` touches the filesystem.

Choice: a workload without `uid` gets "<clusterId>//Pod/<namespace>/<name>", the shape istiod uses
for pods ("cluster/group/kind/namespace/name", empty group for core kinds), so uids stay unique
and recognisable when a file is later replaced by xDS.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..errors import ConfigError, IdentityError
from ..identity.spiffe import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, Identity
from ..state.policy import (
    Action,
    Authorization,
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

if TYPE_CHECKING:
    from ..config import Config

T = TypeVar("T")

_MAX_PORT = 65_535
_MAX_U32 = 2**32 - 1  # capacity is a protobuf UInt32Value

_TOP_KEYS = ("workloads", "services", "policies")
_WORKLOAD_KEYS = (
    "uid", "name", "namespace", "workloadIps", "protocol", "trustDomain", "serviceAccount",
    "network", "node", "clusterId", "workloadName", "workloadType", "canonicalName",
    "canonicalRevision", "status", "locality", "services", "authorizationPolicies", "capacity",
    "waypoint", "applicationTunnel",
)
_WORKLOAD_UNSUPPORTED = (
    "networkGateway", "hostname", "nativeTunnel", "networkMode",
)
_WORKLOAD_TYPES = ("deployment", "cronjob", "pod", "job")
_LOCALITY_KEYS = ("region", "zone", "subzone")
_SERVICE_KEYS = ("name", "namespace", "hostname", "vips", "ports", "subjectAltNames", "canonical",
                 "waypoint", "weightedWaypoints")
_SERVICE_UNSUPPORTED = (
    "cidrVips", "endpoints", "loadBalancer", "ipFamilies", "visibility",
)
# A waypoint is one of: {address: "network/ip"}, {hostname: {namespace, hostname}}, or the
# config_dump form {destination: "network/ip" | "namespace/hostname"}; plus hboneMtlsPort.
_GATEWAY_KEYS = ("address", "hostname", "destination", "hboneMtlsPort")
_HOSTNAME_KEYS = ("namespace", "hostname")
_WEIGHTED_KEYS = ("destination", "weight")
_APP_TUNNEL_KEYS = ("protocol", "port")
DEFAULT_HBONE_MTLS_PORT = 15008  # a waypoint without hboneMtlsPort listens for HBONE here
_POLICY_KEYS = ("name", "namespace", "scope", "action", "rules", "dryRun")
_STRING_MATCH_FIELDS = {
    "namespaces": "namespaces", "notNamespaces": "not_namespaces",
    "principals": "principals", "notPrincipals": "not_principals",
}
_SA_MATCH_FIELDS = {"serviceAccounts": "service_accounts", "notServiceAccounts": "not_service_accounts"}
_CIDR_MATCH_FIELDS = {
    "sourceIps": "source_ips", "notSourceIps": "not_source_ips",
    "destinationIps": "destination_ips", "notDestinationIps": "not_destination_ips",
}
_PORT_MATCH_FIELDS = {"destinationPorts": "destination_ports", "notDestinationPorts": "not_destination_ports"}
_MATCH_KEYS = (*_STRING_MATCH_FIELDS, *_SA_MATCH_FIELDS, *_CIDR_MATCH_FIELDS, *_PORT_MATCH_FIELDS)
_STRING_MATCH_KINDS = {"Exact": StringMatchKind.EXACT, "Prefix": StringMatchKind.PREFIX,
                       "Suffix": StringMatchKind.SUFFIX}


@dataclass(frozen=True)
class LocalConfig:
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()


def load_local_config(path: Path) -> LocalConfig:
    """Read and parse the file LOCAL_XDS_PATH names."""
    source = f"LOCAL_XDS_PATH={path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, "", f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise ConfigError(source, "", f"cannot read: {e.strerror or e}") from None
    return parse_local_config(text, source)


def local_config_from(config: "Config") -> LocalConfig | None:
    """The local config the process Config points at (file or inline), or None for xDS."""
    if config.local_xds_path is not None:
        return load_local_config(config.local_xds_path)
    if config.local_xds is not None:
        return parse_local_config(config.local_xds, "LOCAL_XDS")
    return None


def parse_local_config(text: str, source: str) -> LocalConfig:
    """Parse local config YAML; `source` names it in errors (e.g. "LOCAL_XDS_PATH=/etc/z.yaml")."""
    # imported here: PyYAML is ~1 MiB of idle RSS that an xDS-mode instance never uses
    import yaml

    from .strict_yaml import load_strict

    try:
        document = load_strict(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, "", f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"invalid YAML: {e}") from None
    try:
        return _document(document)
    except _Refusal as r:
        raise ConfigError(source, r.path, r.reason) from None


# --- validation primitives (raise _Refusal; parse_local_config adds the source) ------------------


class _Refusal(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path = path
        self.reason = reason


def _at(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                       (list, "list"), (dict, "mapping")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _expect(value: object, kind: type, name: str, path: str) -> Any:
    # bool is an int subclass: `true` must not pass as a port.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Refusal(path, f"expected {name}, got {_type_name(value)}")
    return value


def _mapping(value: object, path: str, keys: tuple[str, ...] = (),
             unsupported: tuple[str, ...] = ()) -> dict:
    """A mapping; with `keys`, also refuse keys outside `keys` (the first offender in file order)."""
    mapping = _expect(value, dict, "a mapping", path)
    if keys:
        for key in mapping:
            if key in unsupported:
                raise _Refusal(_at(path, key), "not supported yet")
            if key not in keys:
                raise _Refusal(_at(path, key), f"unknown key; accepted: {', '.join(keys)}")
    return mapping


def _list(value: object, path: str) -> list:
    return _expect(value, list, "a list", path)


def _items(m: dict, key: str, path: str, parse: Callable[[object, str], T]) -> tuple[T, ...]:
    """Parse the optional list `m[key]` element by element, with `key[i]` paths."""
    value = m.get(key)
    if value is None:
        return ()
    where = _at(path, key)
    return tuple(parse(item, f"{where}[{i}]") for i, item in enumerate(_list(value, where)))


def _str(m: dict, key: str, path: str, default: str = "", *, required: bool = False) -> str:
    where = _at(path, key)
    value = m.get(key)
    if value is None:
        if required:
            raise _Refusal(where, "required")
        return default
    text = _expect(value, str, "a string", where)
    if required and not text:
        raise _Refusal(where, "must not be empty")
    return text


def _bool(m: dict, key: str, path: str, default: bool = False) -> bool:
    value = m.get(key)
    return default if value is None else _expect(value, bool, "a boolean (true/false)", _at(path, key))


def _choice(m: dict, key: str, path: str, accepted: tuple[str, ...], default: str | None) -> str:
    where = _at(path, key)
    value = m.get(key)
    if value is None:
        if default is None:
            raise _Refusal(where, f"required; accepted: {', '.join(accepted)}")
        return default
    text = _expect(value, str, "a string", where)
    if text not in accepted:
        raise _Refusal(where, f"invalid value {text!r}; accepted: {', '.join(accepted)}")
    return text


def _int(value: object, path: str, low: int, high: int, what: str) -> int:
    number = _expect(value, int, f"an integer ({what})", path)
    if not low <= number <= high:
        raise _Refusal(path, f"{what} {number} out of range; accepted: {low}..{high}")
    return number


def _ip(value: object, path: str) -> IpAddress:
    text = _expect(value, str, "an IP address string", path)
    try:
        return canonical_ip(text)
    except ValueError:
        raise _Refusal(path, f"invalid IP address {text!r}") from None


def _cidr(value: object, path: str) -> IPv4Network | IPv6Network:
    """"10.0.0.0/8" or a plain IP (= /32 or /128).  Host bits are dropped: 10.0.0.1/8 = 10.0.0.0/8."""
    text = _expect(value, str, "a CIDR string", path)
    try:
        if "/" in text:
            return ip_network(text, strict=False)
        return ip_network(canonical_ip(text))
    except ValueError:
        raise _Refusal(path, f"invalid CIDR or IP address {text!r}") from None


def _port_map(value: object, path: str) -> MappingProxyType:
    """{service port: target port}; service ports 1..65535, target 0..65535 (0 = same port)."""
    if value is None:
        return MappingProxyType({})
    ports: dict[int, int] = {}
    for key, target in _mapping(value, path).items():
        where = _at(path, key)
        # JSON (LOCAL_XDS may be JSON) cannot have integer keys, so "80" is accepted too.
        if isinstance(key, str) and key.isascii() and key.isdigit():
            key = int(key)
        service_port = _int(key, where, 1, _MAX_PORT, "service port")
        if service_port in ports:
            raise _Refusal(where, f"service port {service_port} listed twice")
        if not isinstance(target, int) or isinstance(target, bool):
            raise _Refusal(where, f"expected an integer (target port), got {_type_name(target)}")
        if not 0 <= target <= _MAX_PORT:
            raise _Refusal(where, f"target port {target} out of range; accepted: 0..65535 "
                                  "(0 = same as the service port)")
        ports[service_port] = target
    return MappingProxyType(ports)


def _namespaced(text: object, path: str, what: str) -> str:
    """A "<namespace>/<name>" reference with both parts non-empty."""
    value = _expect(text, str, "a string", path)
    namespace, slash, name = value.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise _Refusal(path, f"invalid key {value!r}; expected <namespace>/<{what}>")
    return value


# --- the document --------------------------------------------------------------------------------


def _document(document: object) -> LocalConfig:
    if document is None:
        raise _Refusal("", "empty document; expected a mapping with workloads, services, policies")
    if not isinstance(document, dict):
        raise _Refusal("", f"top level must be a mapping with workloads, services, policies; "
                           f"got {_type_name(document)}")
    top = _mapping(document, "", _TOP_KEYS)
    workloads = _items(top, "workloads", "", _workload)
    services = _items(top, "services", "", _service)
    policies = _items(top, "policies", "", _policy)
    _check_workloads(workloads)
    _check_services(services)
    _check_policies(policies)
    return LocalConfig(workloads, services, policies)


def _workload(value: object, path: str) -> Workload:
    m = _mapping(value, path, _WORKLOAD_KEYS, _WORKLOAD_UNSUPPORTED)
    name = _str(m, "name", path, required=True)
    namespace = _str(m, "namespace", path, required=True)
    cluster_id = _str(m, "clusterId", path, "Kubernetes")
    uid = _str(m, "uid", path) or f"{cluster_id}//Pod/{namespace}/{name}"

    services_path = _at(path, "services")
    services = {
        _namespaced(key, _at(services_path, key), "hostname"): _port_map(ports, _at(services_path, key))
        for key, ports in _mapping(_or_empty(m.get("services")), services_path).items()
    }
    capacity = m.get("capacity")
    return Workload(
        uid=uid,
        name=name,
        namespace=namespace,
        workload_ips=_items(m, "workloadIps", path, _ip),
        protocol=TunnelProtocol(_choice(m, "protocol", path, ("TCP", "HBONE"), "TCP")),
        trust_domain=_str(m, "trustDomain", path, DEFAULT_TRUST_DOMAIN),
        service_account=_str(m, "serviceAccount", path, DEFAULT_SERVICE_ACCOUNT),
        network=_str(m, "network", path),
        node=_str(m, "node", path),
        cluster_id=cluster_id,
        workload_name=_str(m, "workloadName", path),
        workload_type=_choice(m, "workloadType", path, _WORKLOAD_TYPES, "deployment"),
        canonical_name=_str(m, "canonicalName", path),
        canonical_revision=_str(m, "canonicalRevision", path),
        status=WorkloadStatus(_choice(m, "status", path, ("Healthy", "Unhealthy"), "Healthy")),
        locality=_locality(m.get("locality"), _at(path, "locality")),
        services=MappingProxyType(services),
        authorization_policies=_items(
            m, "authorizationPolicies", path, lambda v, p: _namespaced(v, p, "policy name")),
        capacity=1 if capacity is None else _int(capacity, _at(path, "capacity"), 1, _MAX_U32,
                                                 "capacity"),
        waypoint=_optional(m, "waypoint", path, _gateway),
        application_tunnel=_optional(m, "applicationTunnel", path, _application_tunnel),
    )


def _optional(m: dict, key: str, path: str, parse: Callable[[object, str], T]) -> T | None:
    value = m.get(key)
    return None if value is None else parse(value, _at(path, key))


def _gateway(value: object, path: str) -> GatewayAddress:
    m = _mapping(value, path, _GATEWAY_KEYS)
    forms = [k for k in ("address", "hostname", "destination") if m.get(k) is not None]
    if len(forms) != 1:
        raise _Refusal(path, "a waypoint has exactly one of address (\"network/ip\"), "
                             "hostname ({namespace, hostname}) or destination")
    port_value = m.get("hboneMtlsPort")
    port = DEFAULT_HBONE_MTLS_PORT if port_value is None else \
        _int(port_value, _at(path, "hboneMtlsPort"), 1, _MAX_PORT, "port")
    (form,) = forms
    where = _at(path, form)
    if form == "address":
        vip = _vip(m[form], where)
        return GatewayAddress(network=vip.network, address=vip.address, hbone_mtls_port=port)
    if form == "hostname":
        h = _mapping(m[form], where, _HOSTNAME_KEYS)
        return GatewayAddress(namespace=_str(h, "namespace", where, required=True),
                              hostname=_str(h, "hostname", where, required=True), hbone_mtls_port=port)
    # destination: "network/ip" when the part after the last "/" is an IP, else "namespace/hostname"
    text = _expect(m[form], str, 'a "network/ip" or "namespace/hostname" string', where)
    head, slash, tail = text.rpartition("/")
    try:
        return GatewayAddress(network=head, address=canonical_ip(tail), hbone_mtls_port=port)
    except ValueError:
        pass
    if not slash or not head or not tail:
        raise _Refusal(where, f"invalid destination {text!r}; expected <network>/<ip> or <namespace>/<hostname>")
    return GatewayAddress(namespace=head, hostname=tail, hbone_mtls_port=port)


def _weighted_waypoint(value: object, path: str) -> WeightedWaypoint:
    m = _mapping(value, path, _WEIGHTED_KEYS)
    if m.get("destination") is None:
        raise _Refusal(_at(path, "destination"), "required")
    weight = m.get("weight")
    return WeightedWaypoint(
        destination=_gateway(m["destination"], _at(path, "destination")),
        weight=1 if weight is None else _int(weight, _at(path, "weight"), 0, _MAX_U32, "weight"),
    )


def _application_tunnel(value: object, path: str) -> ApplicationTunnel:
    m = _mapping(value, path, _APP_TUNNEL_KEYS)
    protocol = _choice(m, "protocol", path, tuple(p.value for p in ApplicationTunnelProtocol), "NONE")
    port = m.get("port")
    return ApplicationTunnel(
        protocol=ApplicationTunnelProtocol(protocol),
        port=0 if port is None else _int(port, _at(path, "port"), 1, _MAX_PORT, "port"),
    )


def _or_empty(value: object) -> object:
    return {} if value is None else value


def _locality(value: object, path: str) -> Locality:
    if value is None:
        return Locality()
    m = _mapping(value, path, _LOCALITY_KEYS)
    return Locality(_str(m, "region", path), _str(m, "zone", path), _str(m, "subzone", path))


def _service(value: object, path: str) -> Service:
    m = _mapping(value, path, _SERVICE_KEYS, _SERVICE_UNSUPPORTED)
    return Service(
        name=_str(m, "name", path, required=True),
        namespace=_str(m, "namespace", path, required=True),
        hostname=_str(m, "hostname", path, required=True),
        vips=_items(m, "vips", path, _vip),
        ports=_port_map(m.get("ports"), _at(path, "ports")),
        subject_alt_names=_items(m, "subjectAltNames", path, _spiffe_id),
        canonical=_bool(m, "canonical", path),
        waypoint=_optional(m, "waypoint", path, _gateway),
        weighted_waypoints=_items(m, "weightedWaypoints", path, _weighted_waypoint),
    )


def _vip(value: object, path: str) -> NetworkAddress:
    """"network/ip", or a bare "ip" on the default network "".  IPv6 has no "/", so the last
    "/" separates the two."""
    text = _expect(value, str, 'a "network/ip" string', path)
    network, _, address = text.rpartition("/")
    return NetworkAddress(network, _ip(address, path))


def _spiffe_id(value: object, path: str) -> str:
    text = _expect(value, str, "a SPIFFE id string", path)
    try:
        Identity.parse(text)
    except IdentityError as e:
        raise _Refusal(path, str(e)) from None
    return text


def _policy(value: object, path: str) -> Authorization:
    m = _mapping(value, path, _POLICY_KEYS)
    return Authorization(
        name=_str(m, "name", path, required=True),
        namespace=_str(m, "namespace", path, required=True),
        scope=Scope(_choice(m, "scope", path, tuple(s.value for s in Scope), None)),
        action=Action(_choice(m, "action", path, tuple(a.value for a in Action), None)),
        rules=_items(m, "rules", path, _rule),
        dry_run=_bool(m, "dryRun", path),
    )


def _rule(value: object, path: str) -> tuple[tuple[Match, ...], ...]:
    return tuple(_clause(c, f"{path}[{i}]") for i, c in enumerate(_list(value, path)))


def _clause(value: object, path: str) -> tuple[Match, ...]:
    return tuple(_match(x, f"{path}[{i}]") for i, x in enumerate(_list(value, path)))


def _match(value: object, path: str) -> Match:
    m = _mapping(value, path, _MATCH_KEYS)
    fields: dict[str, tuple] = {}
    for key, field in _STRING_MATCH_FIELDS.items():
        fields[field] = _items(m, key, path, _string_match)
    for key, field in _SA_MATCH_FIELDS.items():
        fields[field] = _items(m, key, path, _service_account_match)
    for key, field in _CIDR_MATCH_FIELDS.items():
        fields[field] = _items(m, key, path, _cidr)
    for key, field in _PORT_MATCH_FIELDS.items():
        fields[field] = _items(m, key, path, lambda v, p: _int(v, p, 1, _MAX_PORT, "port"))
    return Match(**fields)


def _string_match(value: object, path: str) -> StringMatch:
    accepted = "{Exact: x}, {Prefix: x}, {Suffix: x}, {Presence: []} or the plain string Presence"
    # {Presence: []} is how ztunnel's config_dump writes it (a serde tuple variant): a dumped
    # policy pastes back.
    if value == "Presence" or value == {"Presence": []}:
        return StringMatch(StringMatchKind.PRESENCE)
    if not isinstance(value, dict):
        raise _Refusal(path, f"invalid string match {value!r}; accepted: {accepted}")
    if len(value) != 1:
        raise _Refusal(path, f"a string match has exactly one key; accepted: {accepted}")
    ((kind, text),) = value.items()
    if kind not in _STRING_MATCH_KINDS:
        raise _Refusal(_at(path, kind), f"unknown string match; accepted: {accepted}")
    return StringMatch(_STRING_MATCH_KINDS[kind], _expect(text, str, "a string", _at(path, kind)))


def _service_account_match(value: object, path: str) -> ServiceAccountMatch:
    m = _mapping(value, path, ("namespace", "serviceAccount"))
    return ServiceAccountMatch(_str(m, "namespace", path, required=True),
                               _str(m, "serviceAccount", path, required=True))


# --- cross-object checks -------------------------------------------------------------------------


def _check_workloads(workloads: tuple[Workload, ...]) -> None:
    uids: dict[str, int] = {}
    ips: dict[tuple[str, IpAddress], int] = {}
    for i, w in enumerate(workloads):
        path = f"workloads[{i}]"
        if w.uid in uids:
            raise _Refusal(f"{path}.uid", f"duplicate workload uid {w.uid!r} "
                                          f"(also workloads[{uids[w.uid]}])")
        uids[w.uid] = i
        for k, ip in enumerate(w.workload_ips):
            owner = ips.get((w.network, ip))
            if owner is not None:
                where = "listed twice on this workload" if owner == i else \
                    f"already used by workloads[{owner}] ({workloads[owner].uid})"
                raise _Refusal(f"{path}.workloadIps[{k}]",
                               f"{ip} on network {w.network!r} {where}")
            ips[(w.network, ip)] = i


def _check_services(services: tuple[Service, ...]) -> None:
    keys: dict[str, int] = {}
    vips: dict[tuple[str, IpAddress], int] = {}
    for i, s in enumerate(services):
        path = f"services[{i}]"
        if s.key in keys:
            raise _Refusal(f"{path}.hostname", f"duplicate service {s.key} (also services[{keys[s.key]}])")
        keys[s.key] = i
        for k, vip in enumerate(s.vips):
            owner = vips.get((vip.network, vip.address))
            if owner is not None:
                where = "listed twice on this service" if owner == i else \
                    f"already used by services[{owner}] ({services[owner].key})"
                raise _Refusal(f"{path}.vips[{k}]", f"duplicate VIP {vip}: {where}")
            vips[(vip.network, vip.address)] = i


def _check_policies(policies: tuple[Authorization, ...]) -> None:
    keys: dict[str, int] = {}
    for i, p in enumerate(policies):
        if p.key in keys:
            raise _Refusal(f"policies[{i}].name", f"duplicate policy {p.key} (also policies[{keys[p.key]}])")
        keys[p.key] = i
