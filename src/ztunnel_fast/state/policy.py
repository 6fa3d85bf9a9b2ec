"""L4 authorization policies as ztunnel receives them (istio.security.Authorization).

Role: the data model only.  Evaluation (reference section 6) lives in `state/rbac.py`: pure
functions over these objects and a connection's attributes, compiled once per policy snapshot.

Invariants:
- Everything is immutable and hashable: tuples, enums, ipaddress networks (never strings).
- `rules` keeps the wire nesting: rules are OR-ed, the clauses of a rule AND-ed, the matches of a
  clause OR-ed.  Inside one Match the populated fields are AND-ed, the values of a field OR-ed,
  and a `not_*` field matches when none of its values does.  A Match with no field set is skipped
  by evaluation (it matches nothing), which `Match.is_empty` lets evaluation test cheaply.
- Principals are compared without the `spiffe://` scheme (Identity.principal).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from ipaddress import IPv4Network, IPv6Network

IpNetwork = IPv4Network | IPv6Network


class Scope(enum.Enum):
    GLOBAL = "Global"  # mesh-wide (from the root namespace)
    NAMESPACE = "Namespace"  # every workload in the policy's namespace
    WORKLOAD_SELECTOR = "WorkloadSelector"  # workloads listing it in `authorization_policies`


class Action(enum.Enum):
    ALLOW = "Allow"
    DENY = "Deny"


class StringMatchKind(enum.Enum):
    EXACT = "Exact"
    PREFIX = "Prefix"
    SUFFIX = "Suffix"
    PRESENCE = "Presence"  # any non-empty value; `value` is unused ("")


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: StringMatchKind
    value: str = ""


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class Match:
    namespaces: tuple[StringMatch, ...] = ()  # namespace of the peer's SPIFFE id
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()  # peer SPIFFE id without "spiffe://"
    not_principals: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()  # peer identity's ns + sa
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    source_ips: tuple[IpNetwork, ...] = ()  # client IP (outer TCP peer for HBONE)
    not_source_ips: tuple[IpNetwork, ...] = ()
    destination_ips: tuple[IpNetwork, ...] = ()  # destination workload IP
    not_destination_ips: tuple[IpNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()  # the target port, after service -> target mapping
    not_destination_ports: tuple[int, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


Clause = tuple[Match, ...]  # matches OR-ed
Rule = tuple[Clause, ...]  # clauses AND-ed


@dataclass(frozen=True, slots=True)
class Authorization:
    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...] = ()  # OR-ed; no rules => the policy never matches
    dry_run: bool = False  # evaluated and logged, never enforced

    @property
    def key(self) -> str:
        """The xDS resource name and the form workloads' `authorization_policies` use."""
        return f"{self.namespace}/{self.name}"
