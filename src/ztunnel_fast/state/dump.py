"""The admin `/config_dump` view of state: ztunnel's camelCase shapes (reference 7.3), pure.

`istioctl ztunnel-config`-style readers and `ztunnel-fast proxy-config` consume this.  Policies are
rendered in the local-config shape (`rules` nested three lists deep, StringMatch as `{Exact: x}` /
`{Presence: []}`), so a dumped policy can be pasted back into a LOCAL_XDS_PATH file.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

from .policy import Authorization, Match, ServiceAccountMatch, StringMatch, StringMatchKind
from .service import Service
from .store import ProxyState
from .workload import GatewayAddress, Workload


def workload_json(w: Workload) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uid": w.uid,
        "workloadIps": [str(ip) for ip in w.workload_ips],
        "protocol": w.protocol.value,
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.service_account,
        "trustDomain": w.trust_domain,
        "workloadName": w.workload_name,
        "workloadType": w.workload_type,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "clusterId": w.cluster_id,
        "node": w.node,
        "network": w.network,
        "status": w.status.value,
        "capacity": w.capacity,
    }
    if any(dataclasses.astuple(w.locality)):
        out["locality"] = dataclasses.asdict(w.locality)
    if w.services:
        out["services"] = {key: {str(p): t for p, t in ports.items()} for key, ports in w.services.items()}
    if w.authorization_policies:
        out["authorizationPolicies"] = list(w.authorization_policies)
    if w.waypoint is not None:
        out["waypoint"] = gateway_json(w.waypoint)
    if w.application_tunnel is not None:
        tunnel: dict[str, Any] = {"protocol": w.application_tunnel.protocol.value}
        if w.application_tunnel.port:
            tunnel["port"] = w.application_tunnel.port
        out["applicationTunnel"] = tunnel
    return out


def gateway_json(g: GatewayAddress) -> dict[str, Any]:
    return {"destination": g.destination, "hboneMtlsPort": g.hbone_mtls_port}


def service_json(s: Service, state: ProxyState) -> dict[str, Any]:
    out = {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": [str(v) for v in s.vips],
        "ports": {str(p): t for p, t in s.ports.items()},
        "endpoints": {
            ep.workload.uid: {"workloadUid": ep.workload.uid, "service": s.key,
                              "port": {str(p): t for p, t in ep.ports.items()}}
            for ep in state.endpoints(s)
        },
        "subjectAltNames": list(s.subject_alt_names),
        "canonical": s.canonical,
    }
    if s.waypoint is not None:
        out["waypoint"] = gateway_json(s.waypoint)
    if s.weighted_waypoints:
        out["weightedWaypoints"] = [{"destination": gateway_json(ww.destination), "weight": ww.weight}
                                    for ww in s.weighted_waypoints]
    return out


def _string_match(m: StringMatch) -> Any:
    # ztunnel (serde) writes the Presence tuple variant as {"Presence": []}
    return {"Presence": []} if m.kind is StringMatchKind.PRESENCE else {m.kind.value: m.value}


def _sa(m: ServiceAccountMatch) -> dict[str, str]:
    return {"namespace": m.namespace, "serviceAccount": m.service_account}


_MATCH_FIELDS = {
    "namespaces": _string_match, "not_namespaces": _string_match,
    "principals": _string_match, "not_principals": _string_match,
    "service_accounts": _sa, "not_service_accounts": _sa,
    "source_ips": str, "not_source_ips": str, "destination_ips": str, "not_destination_ips": str,
    "destination_ports": int, "not_destination_ports": int,
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def match_json(m: Match) -> dict[str, Any]:
    out = {}
    for name, render in _MATCH_FIELDS.items():
        values = getattr(m, name)
        if values:
            out[_camel(name)] = [render(v) for v in values]
    return out


def policy_json(p: Authorization) -> dict[str, Any]:
    return {
        "name": p.name,
        "namespace": p.namespace,
        "scope": p.scope.value,
        "action": p.action.value,
        "rules": [[[match_json(m) for m in clause] for clause in rule] for rule in p.rules],
        "dryRun": p.dry_run,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {_camel(f.name): _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def config_json(config) -> dict[str, Any]:
    """The effective configuration, camelCase keys."""
    out = {_camel(f.name): _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    token = config.auth_token
    if token is not None and not token.startswith(("/", "./")):
        out["authToken"] = "<redacted>"  # a literal bearer token never leaves the process
    return out


def config_dump(state: ProxyState, *, config, certificates: list[dict], version: dict[str, Any]) -> dict[str, Any]:
    workloads = [workload_json(w) for w in state.workloads()]
    services = [service_json(s, state) for s in state.services()]
    policies = [policy_json(p) for p in state.policies()]
    return {
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "stagedServices": {},
        "staticConfig": {"workloads": workloads, "services": services, "policies": policies},
        "version": version,
        "config": config_json(config),
        "certificates": certificates,
    }
