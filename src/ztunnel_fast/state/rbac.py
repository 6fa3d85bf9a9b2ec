"""L4 authorization: which policies apply to a workload, and the allow/deny decision (reference 6).

Role: pure decisions.  `PolicyIndex.build` turns one policy snapshot into an index and compiles
every Authorization once; `authorize(index, workload, conn)` answers one connection; `evaluate`
answers for an explicit list of policies (the order of reference 6, the function tests pin).

Decision order (ztunnel `assert_rbac`), over the applicable policies in order namespace, global,
selector keys:
  1. dry-run DENY policies that match are recorded (log only);
  2. the first non-dry-run DENY that matches rejects: "explicitly denied by: ns/name";
  3. dry-run ALLOW policies that match are recorded (log only);
  4. no non-dry-run ALLOW policy -> allowed;
  5. the first ALLOW that matches -> allowed; else "allow policies exist, but none allowed".

Invariants:
- Dry-run policies never change `allowed`, `reason` or `policy`; they only appear in `dry_run`.
- Match semantics equal ztunnel's `Authorization::matches`: no rules -> never matches; rules OR-ed;
  clauses AND-ed (an empty clause matches, so a rule without clauses matches everything); the
  matches of a clause OR-ed, an empty Match skipped (matches nothing); inside a Match the
  populated fields AND-ed, values OR-ed; `not_*` matches when none of its values does.
- A connection without identity has namespace "" and never matches a principal or a service
  account (so `notPrincipals: [Presence]` matches exactly the plaintext connections: STRICT).
- Compilation preserves those semantics exactly: exact strings and ports become frozensets,
  CIDRs become (mask, network) integer pairs per IP version, IPv4-mapped IPv6 (addresses and
  networks) is folded to IPv4 on both sides, so a policy and a dual-stack socket agree.
- A PolicyIndex is an immutable snapshot; its only internal state is a memo of the partitioned
  policy set per (namespace, authorization_policies) shape, which is a function of the snapshot.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Callable, Iterable, Sequence

from ..identity.spiffe import Identity
from .policy import (
    Action,
    Authorization,
    IpNetwork,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from .store import canonical_ip
from .workload import IpAddress, Workload

ALLOWED = "allowed"
NOT_ALLOWED = "allow policies exist, but none allowed"
EXPLICITLY_DENIED = "explicitly denied by: "  # + "ns/name"

_MAPPED_V6 = IPv6Network("::ffff:0:0/96")  # IPv4-mapped IPv6: ::ffff:a.b.c.d


# --- what a decision sees -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """The attributes of one inbound connection that authorization looks at (reference 6)."""

    src_ip: IpAddress  # client IP; for HBONE the outer TCP peer IP (canonical: mapped v6 -> v4)
    dst_ip: IpAddress  # destination workload IP (canonical)
    dst_port: int  # TARGET port after service -> target translation, never 15008
    src_identity: Identity | None  # from the peer certificate; None on plaintext 15006
    # Derived once here so that re-evaluation (policy updates) and every policy reuse them.
    _src: tuple[int, int] = field(init=False, repr=False, compare=False)  # (version, int)
    _dst: tuple[int, int] = field(init=False, repr=False, compare=False)
    _principal: str | None = field(init=False, repr=False, compare=False)  # id without spiffe://
    _namespace: str = field(init=False, repr=False, compare=False)  # "" without identity
    _sa: tuple[str, str] | None = field(init=False, repr=False, compare=False)  # (ns, sa)

    def __post_init__(self) -> None:
        src = canonical_ip(self.src_ip)
        dst = canonical_ip(self.dst_ip)
        setattr_ = object.__setattr__
        setattr_(self, "src_ip", src)
        setattr_(self, "dst_ip", dst)
        setattr_(self, "_src", (src.version, int(src)))
        setattr_(self, "_dst", (dst.version, int(dst)))
        ident = self.src_identity
        if ident is None:
            setattr_(self, "_principal", None)
            setattr_(self, "_namespace", "")
            setattr_(self, "_sa", None)
        else:
            setattr_(self, "_principal", ident.principal)
            setattr_(self, "_namespace", ident.namespace)
            setattr_(self, "_sa", (ident.namespace, ident.service_account))


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # ALLOWED | "explicitly denied by: ns/name" | NOT_ALLOWED
    policy: str | None  # "ns/name" of the deciding DENY or ALLOW policy; None when none decided
    dry_run: tuple[str, ...] = ()  # "ns/name" of dry-run policies that matched (log only)


_ALLOWED_NO_POLICY = Decision(True, ALLOWED, None)
_NOT_ALLOWED = Decision(False, NOT_ALLOWED, None)


# --- compilation ----------------------------------------------------------------------------------


def canonical_network(net: IpNetwork) -> tuple[IpNetwork, ...]:
    """`net` with IPv4-mapped IPv6 expressed as IPv4 (connections are canonicalised the same way).

    ::ffff:10.0.0.0/104 is 10.0.0.0/8; a v6 network wider than ::ffff:0:0/96 that contains it
    also contains every IPv4 address, so it yields 0.0.0.0/0 next to itself.
    """
    if isinstance(net, IPv4Network) or not net.overlaps(_MAPPED_V6):
        return (net,)
    if net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return (IPv4Network((mapped, net.prefixlen - 96)),)
    return (net, IPv4Network("0.0.0.0/0"))


class _Cidrs:
    """A set of CIDRs as (mask, network) integers per IP version: membership without objects."""

    __slots__ = ("v4", "v6")

    def __init__(self, nets: Iterable[IpNetwork]):
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for raw in nets:
            for net in canonical_network(raw):
                pair = (int(net.netmask), int(net.network_address))
                (v4 if net.version == 4 else v6).append(pair)
        self.v4 = tuple(dict.fromkeys(v4))
        self.v6 = tuple(dict.fromkeys(v6))

    def contains(self, addr: tuple[int, int]) -> bool:
        version, value = addr
        for mask, net in self.v4 if version == 4 else self.v6:
            if value & mask == net:
                return True
        return False


class _Strings:
    """StringMatch values OR-ed: exact as a frozenset, prefixes/suffixes as tuples for str methods."""

    __slots__ = ("exact", "prefixes", "suffixes", "presence")

    def __init__(self, matches: Iterable[StringMatch]):
        exact, prefixes, suffixes, presence = set(), [], [], False
        for m in matches:
            if m.kind is StringMatchKind.EXACT:
                exact.add(m.value)
            elif m.kind is StringMatchKind.PREFIX:
                prefixes.append(m.value)
            elif m.kind is StringMatchKind.SUFFIX:
                suffixes.append(m.value)
            else:
                presence = True
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)
        self.presence = presence

    def hit(self, value: str | None) -> bool:
        if value is None:  # no identity: never matches (principals)
            return False
        return (
            value in self.exact
            or (self.presence and value != "")
            or value.startswith(self.prefixes)  # startswith(()) is False
            or value.endswith(self.suffixes)
        )


_Check = Callable[[ConnectionInfo], bool]


def _string_checks(pos: Sequence[StringMatch], neg: Sequence[StringMatch], attr: str) -> list[_Check]:
    checks: list[_Check] = []
    if pos:
        s = _Strings(pos)
        if attr == "_principal":
            checks.append(lambda c: s.hit(c._principal))
        else:
            checks.append(lambda c: s.hit(c._namespace))
    if neg:
        n = _Strings(neg)
        if attr == "_principal":
            checks.append(lambda c: not n.hit(c._principal))
        else:
            checks.append(lambda c: not n.hit(c._namespace))
    return checks


def _sa_checks(pos: Sequence[ServiceAccountMatch], neg: Sequence[ServiceAccountMatch]) -> list[_Check]:
    checks: list[_Check] = []
    if pos:
        s = frozenset((m.namespace, m.service_account) for m in pos)
        checks.append(lambda c: c._sa in s)  # None (no identity) is never in s
    if neg:
        n = frozenset((m.namespace, m.service_account) for m in neg)
        checks.append(lambda c: c._sa not in n)
    return checks


def _ip_checks(pos: Sequence[IpNetwork], neg: Sequence[IpNetwork], src: bool) -> list[_Check]:
    checks: list[_Check] = []
    if pos:
        p = _Cidrs(pos)
        checks.append((lambda c: p.contains(c._src)) if src else (lambda c: p.contains(c._dst)))
    if neg:
        n = _Cidrs(neg)
        checks.append((lambda c: not n.contains(c._src)) if src else (lambda c: not n.contains(c._dst)))
    return checks


def _port_checks(pos: Sequence[int], neg: Sequence[int]) -> list[_Check]:
    checks: list[_Check] = []
    if pos:
        p = frozenset(pos)
        checks.append(lambda c: c.dst_port in p)
    if neg:
        n = frozenset(neg)
        checks.append(lambda c: c.dst_port not in n)
    return checks


def _compile_match(m: Match) -> tuple[_Check, ...]:
    """The populated fields of a non-empty Match as checks to AND; cheapest (ports) first."""
    return (
        *_port_checks(m.destination_ports, m.not_destination_ports),
        *_sa_checks(m.service_accounts, m.not_service_accounts),
        *_string_checks(m.namespaces, m.not_namespaces, "_namespace"),
        *_string_checks(m.principals, m.not_principals, "_principal"),
        *_ip_checks(m.source_ips, m.not_source_ips, src=True),
        *_ip_checks(m.destination_ips, m.not_destination_ips, src=False),
    )


class CompiledPolicy:
    """One Authorization, compiled.  `rules` keeps only what can change the answer:

    - an empty clause (matches everything) is dropped from its rule (AND with true);
    - a clause whose Matches are all empty never matches, so its whole rule is dropped;
    - a rule left with no clauses matches everything: `always` is set and `rules` is unused.
    """

    __slots__ = ("source", "key", "action", "dry_run", "always", "rules", "denied", "allowed")

    def __init__(self, policy: Authorization):
        self.source = policy
        self.key = policy.key
        self.action = policy.action
        self.dry_run = policy.dry_run
        rules: list[tuple[tuple[tuple[_Check, ...], ...], ...]] = []
        always = False
        for rule in policy.rules:
            clauses: list[tuple[tuple[_Check, ...], ...]] = []
            dead = False
            for clause in rule:
                if not clause:
                    continue  # empty clause: matches
                matches = tuple(_compile_match(m) for m in clause if not m.is_empty)
                if not matches:
                    dead = True  # only empty Matches: never matches
                    break
                clauses.append(matches)
            if dead:
                continue
            if not clauses:
                always = True
                break
            rules.append(tuple(clauses))
        self.always = always
        self.rules = () if always else tuple(rules)
        # Preallocated answers: a decision without dry-run hits allocates nothing.
        self.denied = Decision(False, EXPLICITLY_DENIED + self.key, self.key)
        self.allowed = Decision(True, ALLOWED, self.key)

    def matches(self, c: ConnectionInfo) -> bool:
        if self.always:
            return True
        for rule in self.rules:  # OR
            for clause in rule:  # AND
                for checks in clause:  # OR
                    for check in checks:  # AND
                        if not check(c):
                            break
                    else:
                        break  # this Match matched: the clause holds
                else:
                    break  # no Match matched: the rule fails
            else:
                return True  # every clause held
        return False

    def __repr__(self) -> str:
        dry = " dry-run" if self.dry_run else ""
        return f"<CompiledPolicy {self.key} {self.action.value}{dry}>"


@lru_cache(maxsize=4096)
def _compile_cached(policy: Authorization) -> CompiledPolicy:
    return CompiledPolicy(policy)


def compile_policy(policy: Authorization | CompiledPolicy) -> CompiledPolicy:
    """The compiled form (memoised by value for callers without an index)."""
    return policy if isinstance(policy, CompiledPolicy) else _compile_cached(policy)


def matches(policy: Authorization | CompiledPolicy, conn: ConnectionInfo) -> bool:
    """Whether `policy`'s rules match `conn` (action and dry-run play no part here)."""
    return compile_policy(policy).matches(conn)


# --- the decision ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Applicable policies partitioned by the four steps of the decision, each in applicable order."""

    dry_deny: tuple[CompiledPolicy, ...] = ()
    deny: tuple[CompiledPolicy, ...] = ()
    dry_allow: tuple[CompiledPolicy, ...] = ()
    allow: tuple[CompiledPolicy, ...] = ()

    @classmethod
    def of(cls, policies: Iterable[CompiledPolicy]) -> "PolicySet":
        dry_deny, deny, dry_allow, allow = [], [], [], []
        for p in policies:
            if p.action is Action.DENY:
                (dry_deny if p.dry_run else deny).append(p)
            else:
                (dry_allow if p.dry_run else allow).append(p)
        return cls(tuple(dry_deny), tuple(deny), tuple(dry_allow), tuple(allow))


def _decide(ps: PolicySet, c: ConnectionInfo) -> Decision:
    dry: list[str] | None = None
    for p in ps.dry_deny:  # 1. log only
        if p.matches(c):
            dry = dry or []
            dry.append(p.key)
    for p in ps.deny:  # 2. any DENY match rejects
        if p.matches(c):
            return p.denied if dry is None else Decision(False, p.denied.reason, p.key, tuple(dry))
    for p in ps.dry_allow:  # 3. log only
        if p.matches(c):
            dry = dry or []
            dry.append(p.key)
    if not ps.allow:  # 4. no ALLOW policy
        return _ALLOWED_NO_POLICY if dry is None else Decision(True, ALLOWED, None, tuple(dry))
    for p in ps.allow:  # 5. any ALLOW match allows
        if p.matches(c):
            return p.allowed if dry is None else Decision(True, ALLOWED, p.key, tuple(dry))
    return _NOT_ALLOWED if dry is None else Decision(False, NOT_ALLOWED, None, tuple(dry))


def evaluate(policies: Sequence[Authorization | CompiledPolicy], conn: ConnectionInfo) -> Decision:
    """The decision for `conn` under exactly `policies` (already the applicable set, in order)."""
    return _decide(PolicySet.of(compile_policy(p) for p in policies), conn)


# --- which policies apply -------------------------------------------------------------------------


class PolicyIndex:
    """Built once per policy snapshot: by namespace (scope NAMESPACE), global (scope GLOBAL), and
    by key ("ns/name", any scope, for workloads' `authorization_policies`, normally
    WORKLOAD_SELECTOR).  A later policy with an already seen key replaces the earlier one (xDS)."""

    __slots__ = ("_by_key", "_by_namespace", "_global", "_memo")

    def __init__(self, by_key: dict[str, CompiledPolicy]):
        self._by_key = by_key
        by_ns: dict[str, list[CompiledPolicy]] = {}
        glob: list[CompiledPolicy] = []
        for p in by_key.values():
            if p.source.scope is Scope.NAMESPACE:
                by_ns.setdefault(p.source.namespace, []).append(p)
            elif p.source.scope is Scope.GLOBAL:
                glob.append(p)
        self._by_namespace = {ns: tuple(ps) for ns, ps in by_ns.items()}
        self._global = tuple(glob)
        # (namespace, authorization_policies) -> PolicySet; bounded by the workload shapes seen.
        self._memo: dict[tuple[str, tuple[str, ...]], PolicySet] = {}

    @classmethod
    def build(cls, policies: Iterable[Authorization]) -> "PolicyIndex":
        return cls({p.key: CompiledPolicy(p) for p in policies})

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> Authorization | None:
        p = self._by_key.get(key)
        return None if p is None else p.source

    def _applicable(self, namespace: str, keys: tuple[str, ...]) -> tuple[CompiledPolicy, ...]:
        found = list(self._by_namespace.get(namespace, ()))
        found.extend(self._global)
        for key in keys:
            p = self._by_key.get(key)
            if p is not None and p not in found:  # a key naming a ns/global policy: once only
                found.append(p)
        return tuple(found)

    def applicable(self, workload: Workload) -> tuple[Authorization, ...]:
        """Namespace ∪ global ∪ the workload's known selector keys, in that order."""
        ps = self._applicable(workload.namespace, workload.authorization_policies)
        return tuple(p.source for p in ps)

    def unknown_keys(self, workload: Workload) -> tuple[str, ...]:
        """The workload's `authorization_policies` keys this snapshot has no policy for (skipped)."""
        return tuple(k for k in workload.authorization_policies if k not in self._by_key)

    def policy_set(self, workload: Workload) -> PolicySet:
        shape = (workload.namespace, workload.authorization_policies)
        ps = self._memo.get(shape)
        if ps is None:
            ps = self._memo[shape] = PolicySet.of(self._applicable(*shape))
        return ps


def authorize(index: PolicyIndex, workload: Workload, conn: ConnectionInfo) -> Decision:
    """The decision for `conn` to destination `workload` under `index`'s snapshot."""
    return _decide(index.policy_set(workload), conn)


# --- cost ------------------------------------------------------------------------------------------


def _bench_policies(n_policies: int, n_namespaces: int, workload_ns: str,
                    rnd: random.Random) -> tuple[list[Authorization], tuple[str, ...]]:
    """A realistic mix: per namespace mostly ALLOW by principal/namespace/port, some DENY by CIDR,
    some selector-scoped dry-run; 3 global policies (mesh STRICT, a deny CIDR, a dry-run audit);
    5 selector policies for the bench workload (STRICT with a PERMISSIVE port, 4 ALLOW)."""
    presence = StringMatch(StringMatchKind.PRESENCE)

    def one(m: Match) -> tuple:
        return (((m,),),)  # one rule, one clause, one Match

    out: list[Authorization] = [
        Authorization("istio_converted_static_strict", "istio-system", Scope.GLOBAL, Action.DENY,
                      one(Match(not_principals=(presence,), not_destination_ports=(15020,)))),
        Authorization("deny-blackhole", "istio-system", Scope.GLOBAL, Action.DENY,
                      one(Match(source_ips=(ip_network("192.0.2.0/24"), ip_network("2001:db8::/32"))))),
        Authorization("audit", "istio-system", Scope.GLOBAL, Action.DENY,
                      one(Match(namespaces=(StringMatch(StringMatchKind.PREFIX, "legacy-"),))), dry_run=True),
        Authorization("converted_peer_authentication_bench", workload_ns, Scope.WORKLOAD_SELECTOR,
                      Action.DENY, one(Match(not_principals=(presence,), not_destination_ports=(9090,)))),
    ]
    selectors = [out[-1].key]
    for j in range(4):
        m = Match(principals=(StringMatch(StringMatchKind.PREFIX, f"cluster.local/ns/ns-{j}"),),
                  destination_ports=(8080 + j,))
        out.append(Authorization(f"bench-allow-{j}", workload_ns, Scope.WORKLOAD_SELECTOR, Action.ALLOW, one(m)))
        selectors.append(out[-1].key)
    for i in range(max(0, n_policies - len(out))):
        ns = f"ns-{(i // 10) % n_namespaces}"  # ten consecutive policies per namespace, every kind
        peer = f"ns-{rnd.randrange(n_namespaces)}"
        kind = i % 10
        if kind < 6:  # allow a couple of peers on a port
            m = Match(principals=(StringMatch(StringMatchKind.EXACT, f"cluster.local/ns/{peer}/sa/client-{i % 7}"),
                                  StringMatch(StringMatchKind.SUFFIX, f"/sa/svc-{i % 13}")),
                      destination_ports=(8080 + i % 5, 9090))
            out.append(Authorization(f"allow-{i}", ns, Scope.NAMESPACE, Action.ALLOW, one(m)))
        elif kind < 8:  # allow a namespace: a "from" clause AND a "to" clause
            rules = ((((Match(namespaces=(StringMatch(StringMatchKind.EXACT, peer),)),),
                       (Match(destination_ports=(80, 443)),)),))
            out.append(Authorization(f"allow-ns-{i}", ns, Scope.NAMESPACE, Action.ALLOW, rules))
        elif kind == 8:  # deny a source range except from the namespace's admin account
            m = Match(source_ips=(ip_network(f"10.{i % 256}.0.0/16"),),
                      not_service_accounts=(ServiceAccountMatch(ns, "admin"),))
            out.append(Authorization(f"deny-{i}", ns, Scope.NAMESPACE, Action.DENY, one(m)))
        else:  # selector-scoped dry-run ALLOW for some other workload
            m = Match(not_destination_ports=(15020,),
                      principals=(StringMatch(StringMatchKind.PREFIX, "cluster.local/ns/"),))
            out.append(Authorization(f"sel-{i}", ns, Scope.WORKLOAD_SELECTOR, Action.ALLOW, one(m), dry_run=True))
    return out, tuple(selectors)


def bench_decision_cost(n_policies: int = 10_000, n_decisions: int = 10_000, seed: int = 1) -> dict:
    """Decision cost with `n_policies` spread over 1000 namespaces (+ 3 global), for one workload
    that also lists 5 selector policies.  Returns decisions/second and µs per decision for
    `authorize` (index + memo), plus the cost of building the index.  No assertion: bench/ only."""
    rnd = random.Random(seed)
    n_namespaces = 1000
    workload_ns = "ns-42"
    policies, selectors = _bench_policies(n_policies, n_namespaces, workload_ns, rnd)
    t0 = time.perf_counter()
    index = PolicyIndex.build(policies)
    build_s = time.perf_counter() - t0

    wl = Workload(uid="bench", name="bench", namespace=workload_ns,
                  workload_ips=(IPv4Address("10.1.2.3"),), authorization_policies=selectors)
    conns = []
    for i in range(256):  # mixed: plaintext, mTLS from various namespaces, v4 and mapped v6
        peer_ns = f"ns-{(i // 2) % 4}" if i % 2 else f"ns-{rnd.randrange(n_namespaces)}"  # half are expected peers
        ident = None if i % 8 == 0 else Identity("cluster.local", peer_ns,
                                                 f"client-{i % 7}" if i % 3 else f"svc-{i % 13}")
        src = IPv4Address(f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}")
        src_ip: IpAddress = IPv6Address(f"::ffff:{src}") if i % 5 == 0 else src
        port = rnd.choice((80, 443, 8080, 8081, 8082, 8083, 9090, 15020, 3306))
        conns.append(ConnectionInfo(src_ip, wl.workload_ips[0], port, ident))

    authorize(index, wl, conns[0])  # warm the memo, as the first real connection would
    allowed = 0
    t0 = time.perf_counter()
    for i in range(n_decisions):
        allowed += authorize(index, wl, conns[i & 255]).allowed
    elapsed = time.perf_counter() - t0
    return {
        "policies": len(index),
        "namespaces": n_namespaces,
        "applicable": len(index.applicable(wl)),
        "decisions": n_decisions,
        "allowed": allowed,
        "index_build_ms": round(build_s * 1e3, 1),
        "decisions_per_second": round(n_decisions / elapsed) if elapsed else float("inf"),
        "us_per_decision": round(elapsed / n_decisions * 1e6, 3) if n_decisions else 0.0,
    }


__all__ = [
    "ALLOWED", "NOT_ALLOWED", "EXPLICITLY_DENIED", "ConnectionInfo", "Decision", "CompiledPolicy",
    "PolicySet", "PolicyIndex", "canonical_network", "compile_policy", "matches", "evaluate",
    "authorize", "bench_decision_cost",
]
