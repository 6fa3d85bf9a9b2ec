"""ProxyState: one immutable snapshot of workloads, services and policies, with pure lookups;
StateStore: the one place every config source (local file, xDS) applies its changes.

Role: the routing decision asks this module "who is at this IP", "which service owns this VIP",
"which endpoints does this service have".  A new configuration produces a new ProxyState; nobody
edits one in place, so a decision always sees a consistent snapshot.  The StateStore keeps the
mutable indexes (StateIndex) and hands out a new snapshot per applied change set.

Invariants:
- A snapshot's indexes never change; lookups are dict reads.
- Snapshots built by the constructor are unambiguous: two workloads on one (network, IP), two
  workloads with one uid, two services on one (network, VIP) or with one "namespace/hostname" key raise ValueError.  (The
  local config parser refuses those earlier with user-facing errors.)  The StateStore's lenient
  index lets the last writer win instead, as ztunnel does while pods churn.
- IPs are stored and looked up in canonical form: IPv4-mapped IPv6 (::ffff:a.b.c.d), which dual
  stack sockets report for IPv4 peers, is the IPv4 address.
- Endpoints of a service come from workloads' `services` maps, in the order workloads arrived.
- RoundRobin, StateIndex and StateStore are mutable and belong to the single control thread.
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


class StateIndex:
    """The mutable indexes behind ProxyState, updated one object at a time.

    `strict` refuses ambiguity (ValueError) as the ProxyState constructor always has; a lenient
    index (the StateStore's) lets the last writer of a (network, IP) or VIP take it, as ztunnel's
    stores do while pods churn (a new pod may reuse an IP before the old one's removal arrives).
    A removal only drops an IP or VIP entry that still points at the removed object.
    """

    __slots__ = ("strict", "workloads", "by_ip", "by_node", "endpoints", "services", "by_vip",
                 "policies", "_dirty_nodes", "_dirty_endpoints", "_node_tuples", "_endpoint_tuples",
                 "_policy_tuple")

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.workloads: dict[str, Workload] = {}
        self.by_ip: dict[tuple[str, IpAddress], Workload] = {}
        self.by_node: dict[str, dict[str, Workload]] = {}
        self.endpoints: dict[str, dict[str, Endpoint]] = {}
        self.services: dict[str, Service] = {}
        self.by_vip: dict[tuple[str, IpAddress], Service] = {}
        self.policies: dict[str, Authorization] = {}
        # Tuple views handed to snapshots, rebuilt only for the keys a change touched.
        self._node_tuples: dict[str, tuple[Workload, ...]] = {}
        self._endpoint_tuples: dict[str, tuple[Endpoint, ...]] = {}
        self._dirty_nodes: set[str] = set()
        self._dirty_endpoints: set[str] = set()
        # The same tuple object while no policy changes, so consumers can skip recompiling.
        self._policy_tuple: tuple[Authorization, ...] | None = None

    # -- workloads ---------------------------------------------------------------------------
    def upsert_workload(self, w: Workload) -> None:
        old = self.workloads.get(w.uid)
        if old is not None:
            if self.strict:
                raise ValueError(f"duplicate workload uid {w.uid!r}")
            self._unindex_workload(old)
        for ip in w.workload_ips:
            key = (w.network, canonical_ip(ip))
            other = self.by_ip.get(key)
            if self.strict and other is not None and other is not w:
                raise ValueError(f"{key[1]} on network {w.network!r}: workloads {other.uid!r} and {w.uid!r}")
            self.by_ip[key] = w
        self.workloads[w.uid] = w
        self.by_node.setdefault(w.node, {})[w.uid] = w
        self._dirty_nodes.add(w.node)
        for service_key, ports in w.services.items():
            self.endpoints.setdefault(service_key, {})[w.uid] = Endpoint(w, ports)
            self._dirty_endpoints.add(service_key)

    def remove_workload(self, uid: str) -> Workload | None:
        old = self.workloads.pop(uid, None)
        if old is not None:
            self._unindex_workload(old)
        return old

    def _unindex_workload(self, w: Workload) -> None:
        for ip in w.workload_ips:
            key = (w.network, canonical_ip(ip))
            if self.by_ip.get(key) is w:
                del self.by_ip[key]
        on_node = self.by_node.get(w.node)
        if on_node is not None:
            on_node.pop(w.uid, None)
            if not on_node:
                del self.by_node[w.node]
            self._dirty_nodes.add(w.node)
        for service_key in w.services:
            eps = self.endpoints.get(service_key)
            if eps is not None:
                eps.pop(w.uid, None)
                if not eps:
                    del self.endpoints[service_key]
                self._dirty_endpoints.add(service_key)

    # -- services and policies -----------------------------------------------------------------
    def upsert_service(self, s: Service) -> None:
        old = self.services.get(s.key)
        if old is not None:
            if self.strict:
                raise ValueError(f"duplicate service {s.key!r}")
            self._unindex_service(old)
        for vip in s.vips:
            key = (vip.network, canonical_ip(vip.address))
            if self.strict and key in self.by_vip:
                raise ValueError(f"VIP {vip} on services {self.by_vip[key].key!r} and {s.key!r}")
            self.by_vip[key] = s
        self.services[s.key] = s

    def remove_service(self, key: str) -> Service | None:
        old = self.services.pop(key, None)
        if old is not None:
            self._unindex_service(old)
        return old

    def _unindex_service(self, s: Service) -> None:
        for vip in s.vips:
            key = (vip.network, canonical_ip(vip.address))
            if self.by_vip.get(key) is s:
                del self.by_vip[key]

    def upsert_policy(self, p: Authorization) -> None:
        self.policies[p.key] = p
        self._policy_tuple = None

    def remove_policy(self, key: str) -> Authorization | None:
        old = self.policies.pop(key, None)
        if old is not None:
            self._policy_tuple = None
        return old

    # -- snapshots ------------------------------------------------------------------------------
    def snapshot(self) -> "ProxyState":
        """An immutable ProxyState of the current content: shallow copies of the dicts plus the
        tuple views of the node and endpoint lists this change touched."""
        state = object.__new__(ProxyState)
        self._fill(state)
        return state

    def _fill(self, state: "ProxyState") -> None:
        for node in self._dirty_nodes:
            ws = self.by_node.get(node)
            if ws:
                self._node_tuples[node] = tuple(ws.values())
            else:
                self._node_tuples.pop(node, None)
        for key in self._dirty_endpoints:
            eps = self.endpoints.get(key)
            if eps:
                self._endpoint_tuples[key] = tuple(eps.values())
            else:
                self._endpoint_tuples.pop(key, None)
        self._dirty_nodes.clear()
        self._dirty_endpoints.clear()
        state._workloads = tuple(self.workloads.values())
        state._services = tuple(self.services.values())
        if self._policy_tuple is None:
            self._policy_tuple = tuple(self.policies.values())
        state._policies = self._policy_tuple
        state._by_uid = dict(self.workloads)
        state._by_ip = dict(self.by_ip)
        state._by_key = dict(self.services)
        state._by_vip = dict(self.by_vip)
        state._by_node = dict(self._node_tuples)
        state._endpoints = dict(self._endpoint_tuples)


class ProxyState:
    __slots__ = ("_workloads", "_services", "_policies", "_by_ip", "_by_uid", "_by_vip",
                 "_by_key", "_endpoints", "_by_node")

    def __init__(
        self,
        workloads: Iterable[Workload] = (),
        services: Iterable[Service] = (),
        policies: Iterable[Authorization] = (),
    ):
        """A snapshot of exactly these objects; ambiguous indexes raise ValueError."""
        index = StateIndex(strict=True)
        for w in workloads:
            index.upsert_workload(w)
        for s in services:
            index.upsert_service(s)
        for p in policies:
            index.upsert_policy(p)
        index._fill(self)

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

    def pick_any(self, state: ProxyState, service: Service) -> Workload | None:
        """The next healthy endpoint with an IP, whatever its ports: a waypoint named by its
        service is dialled on its HBONE port, which need not be one of the service's ports."""
        candidates = [ep.workload for ep in state.endpoints(service)
                      if ep.workload.status is WorkloadStatus.HEALTHY and ep.workload.workload_ips]
        if not candidates:
            return None
        index = self._next.get(service.key, 0) % len(candidates)
        self._next[service.key] = index + 1
        return candidates[index]


# --- the state store: several sources, one state -------------------------------------------------

LOCAL_SOURCE = "local"  # the local config file (LOCAL_XDS_PATH / LOCAL_XDS)
XDS_SOURCE = "xds"  # istiod over delta xDS

Resource = Workload | Service | Authorization


@dataclass(frozen=True, slots=True)
class Removal:
    """Remove one resource by its xDS name.  `kind` is "address" (a workload uid or a service's
    "<namespace>/<hostname>": Address resources share one name space, as in ztunnel), "workload",
    "service" or "policy" ("<namespace>/<name>")."""

    kind: str
    name: str


class StateStore:
    """Resources of every source, applied as typed changes; each applied change set yields a new
    ProxyState snapshot (what ProxyContext.replace_state takes).

    Invariants:
    - One mutable StateIndex, updated per resource: a change set costs what it touches, plus
      shallow dict copies for the snapshot; nothing is rebuilt from all resources.
    - Each resource is owned by the source that last upserted it.  A source's removal only
      removes what it owns, and `replace` (a source that delivers complete sets, like the local
      file) removes only its own leftovers, so two sources never erase each other's resources.
    - Removals of a change set are applied before its upserts, so a removed pod's IP reused by a
      new pod in the same change ends up with the new pod.
    - Single-threaded: the control loop owns the store.
    """

    def __init__(self) -> None:
        self._index = StateIndex()
        self._owner: dict[tuple[str, str], str] = {}
        self.state: ProxyState = self._index.snapshot()

    def apply(self, source: str, upserts: Iterable[Resource] = (), removals: Iterable[Removal] = ()) -> ProxyState:
        """Apply one change set from `source`; returns (and keeps) the new snapshot."""
        for r in removals:
            self._remove(source, r)
        for obj in upserts:
            self._upsert(source, obj)
        self.state = self._index.snapshot()
        return self.state

    def replace(self, source: str, workloads: Iterable[Workload], services: Iterable[Service],
                policies: Iterable[Authorization]) -> ProxyState:
        """Make `source`'s resources exactly these (a full set, e.g. a reloaded local file)."""
        new = [*workloads, *services, *policies]
        keep = {_key(obj) for obj in new}
        stale = [Removal(kind, name) for (kind, name), owner in self._owner.items()
                 if owner == source and (kind, name) not in keep]
        return self.apply(source, new, stale)

    def owned(self, source: str) -> dict[str, set[str]]:
        """{kind: names} of what `source` holds now (kinds "workload", "service", "policy")."""
        out: dict[str, set[str]] = {"workload": set(), "service": set(), "policy": set()}
        for (kind, name), owner in self._owner.items():
            if owner == source:
                out[kind].add(name)
        return out

    def _upsert(self, source: str, obj: Resource) -> None:
        kind, name = _key(obj)
        if isinstance(obj, Workload):
            self._index.upsert_workload(obj)
        elif isinstance(obj, Service):
            self._index.upsert_service(obj)
        else:
            self._index.upsert_policy(obj)
        self._owner[(kind, name)] = source

    def _remove(self, source: str, r: Removal) -> None:
        kinds = ("workload", "service") if r.kind == "address" else (r.kind,)
        for kind in kinds:
            if self._owner.get((kind, r.name)) != source:
                continue
            del self._owner[(kind, r.name)]
            if kind == "workload":
                self._index.remove_workload(r.name)
            elif kind == "service":
                self._index.remove_service(r.name)
            else:
                self._index.remove_policy(r.name)


def _key(obj: Resource) -> tuple[str, str]:
    if isinstance(obj, Workload):
        return "workload", obj.uid
    if isinstance(obj, Service):
        return "service", obj.key
    return "policy", obj.key
