"""L4 authorization decisions (reference 6), table-driven, without sockets."""

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.state.policy import (
    Action,
    Authorization,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ztunnel_fast.state.rbac import (
    ALLOWED,
    NOT_ALLOWED,
    ConnectionInfo,
    Decision,
    PolicyIndex,
    authorize,
    bench_decision_cost,
    canonical_network,
    evaluate,
    matches,
)
from ztunnel_fast.state.store import ProxyState
from ztunnel_fast.state.workload import Workload
from ztunnel_fast.xds.local import parse_local_config

ALLOW, DENY = Action.ALLOW, Action.DENY
SLEEP = Identity("cluster.local", "demo", "sleep")
OTHER = Identity("example.org", "prod", "api")
PRESENCE = StringMatch(StringMatchKind.PRESENCE)


def exact(v):
    return StringMatch(StringMatchKind.EXACT, v)


def prefix(v):
    return StringMatch(StringMatchKind.PREFIX, v)


def suffix(v):
    return StringMatch(StringMatchKind.SUFFIX, v)


def net(*cidrs):
    return tuple(ip_network(c, strict=False) for c in cidrs)


def conn(src="10.0.0.1", dst="10.0.0.2", port=80, ident=SLEEP):
    return ConnectionInfo(ip_address(src), ip_address(dst), port, ident)


def one(*matches):
    """rules: one rule with one clause OR-ing `matches`."""
    return ((tuple(matches),),)


def pol(name, action=ALLOW, rules=None, *, ns="demo", scope=Scope.NAMESPACE, dry=False, match=None):
    if rules is None:
        rules = one(match if match is not None else ANY)
    return Authorization(name, ns, scope, action, rules, dry)


ANY = Match(not_destination_ports=(0,))  # a non-empty Match that every connection satisfies
NONE = Match(destination_ports=(0,))  # a non-empty Match no connection satisfies (port 0)


# --- the order of reference 6 ---------------------------------------------------------------------

DECISIONS = [
    # (id, policies, expected (allowed, reason, policy, dry_run))
    ("no policies", [], (True, ALLOWED, None, ())),
    ("allow matches", [pol("a")], (True, ALLOWED, "demo/a", ())),
    ("deny matches", [pol("d", DENY)], (False, "explicitly denied by: demo/d", "demo/d", ())),
    ("deny beats allow (allow first)", [pol("a"), pol("d", DENY)],
     (False, "explicitly denied by: demo/d", "demo/d", ())),
    ("first matching deny is reported", [pol("d1", DENY), pol("d2", DENY)],
     (False, "explicitly denied by: demo/d1", "demo/d1", ())),
    ("deny not matching, no allow -> allowed", [pol("d", DENY, match=NONE)], (True, ALLOWED, None, ())),
    ("allow exists, none matches", [pol("a", match=NONE)], (False, NOT_ALLOWED, None, ())),
    ("any allow matches", [pol("a1", match=NONE), pol("a2")], (True, ALLOWED, "demo/a2", ())),
    ("deny not matching, allow matching", [pol("d", DENY, match=NONE), pol("a")],
     (True, ALLOWED, "demo/a", ())),
    ("empty rules never match: allow -> none allowed", [pol("a", rules=())], (False, NOT_ALLOWED, None, ())),
    ("empty rules never match: deny -> allowed", [pol("d", DENY, rules=())], (True, ALLOWED, None, ())),
    # dry-run: reported, never enforced
    ("dry-run deny matching is only reported", [pol("d", DENY, dry=True)], (True, ALLOWED, None, ("demo/d",))),
    ("dry-run deny not matching is not reported", [pol("d", DENY, dry=True, match=NONE)],
     (True, ALLOWED, None, ())),
    ("dry-run allow alone does not make allow policies exist", [pol("a", dry=True, match=NONE)],
     (True, ALLOWED, None, ())),
    ("dry-run allow matching is reported", [pol("a", dry=True)], (True, ALLOWED, None, ("demo/a",))),
    ("dry-run allow does not rescue", [pol("a", dry=True), pol("b", match=NONE)],
     (False, NOT_ALLOWED, None, ("demo/a",))),
    ("dry-run deny with real allow", [pol("d", DENY, dry=True), pol("a")],
     (True, ALLOWED, "demo/a", ("demo/d",))),
    ("dry-run deny reported with real deny", [pol("dd", DENY, dry=True), pol("d", DENY)],
     (False, "explicitly denied by: demo/d", "demo/d", ("demo/dd",))),
    ("dry-run allow not evaluated after a real deny (order of reference 6)",
     [pol("a", dry=True), pol("d", DENY)], (False, "explicitly denied by: demo/d", "demo/d", ())),
    ("dry-run deny and allow in order", [pol("a", dry=True), pol("d", DENY, dry=True)],
     (True, ALLOWED, None, ("demo/d", "demo/a"))),
]


@pytest.mark.parametrize("policies,expected", [d[1:] for d in DECISIONS], ids=[d[0] for d in DECISIONS])
def test_decision_order(policies, expected):
    d = evaluate(policies, conn())
    assert (d.allowed, d.reason, d.policy, d.dry_run) == expected


def test_decision_reason_strings():
    assert evaluate([pol("x", DENY, ns="istio-system")], conn()).reason == "explicitly denied by: istio-system/x"
    assert evaluate([pol("x", match=NONE)], conn()).reason == "allow policies exist, but none allowed"
    assert evaluate([], conn()) == Decision(True, "allowed", None, ())


# --- rule structure -------------------------------------------------------------------------------

PORT80 = Match(destination_ports=(80,))
PORT81 = Match(destination_ports=(81,))
DEMO_NS = Match(namespaces=(exact("demo"),))
PROD_NS = Match(namespaces=(exact("prod"),))
EMPTY = Match()

STRUCTURE = [
    # (id, rules, matches connection (demo/sleep -> port 80))
    ("no rules never matches", (), False),
    ("rule without clauses matches everything", ((),), True),
    ("empty clause matches", (((),),), True),
    ("empty clause AND matching clause", (((), (PORT80,)),), True),
    ("empty clause AND failing clause", (((), (PORT81,)),), False),
    ("empty Match is skipped: alone it never matches", (((EMPTY,),),), False),
    ("empty Match skipped, the other Match decides (match)", (((EMPTY, PORT80),),), True),
    ("empty Match skipped, the other Match decides (no match)", (((EMPTY, PORT81),),), False),
    ("clause of empty Match kills its rule", (((EMPTY,), (PORT80,)),), False),
    ("clause of empty Match kills only its rule", ((((EMPTY,),), ((PORT80,),))), True),
    ("AND across clauses: both hold", (((PORT80,), (DEMO_NS,)),), True),
    ("AND across clauses: one fails", (((PORT80,), (PROD_NS,)),), False),
    ("OR inside a clause", (((PORT81, DEMO_NS),),), True),
    ("OR inside a clause: none holds", (((PORT81, PROD_NS),),), False),
    ("OR across rules", ((((PORT81,),), ((PROD_NS,),), ((DEMO_NS,),))), True),
    ("OR across rules: none holds", ((((PORT81,),), ((PROD_NS,),))), False),
    ("AND of fields inside a Match: both", (((Match(destination_ports=(80,), namespaces=(exact("demo"),)),),),),
     True),
    ("AND of fields inside a Match: one fails",
     (((Match(destination_ports=(80,), namespaces=(exact("prod"),)),),),), False),
    ("OR of values inside a field", (((Match(destination_ports=(81, 80, 82)),),),), True),
    ("positive and not_ of one field AND-ed",
     (((Match(namespaces=(prefix("de"),), not_namespaces=(exact("demo"),)),),),), False),
]


@pytest.mark.parametrize("rules,expected", [s[1:] for s in STRUCTURE], ids=[s[0] for s in STRUCTURE])
def test_rule_structure(rules, expected):
    p = Authorization("p", "demo", Scope.NAMESPACE, ALLOW, rules)
    assert matches(p, conn()) is expected
    # and the decision follows: a DENY with these rules denies exactly when it matches
    assert evaluate([Authorization("p", "demo", Scope.NAMESPACE, DENY, rules)], conn()).allowed is not expected


# --- fields ---------------------------------------------------------------------------------------

V6 = Identity("cluster.local", "v6", "client")
MATCH_FIELDS = [
    # (id, Match, connection, expected)
    # namespaces: of the peer's SPIFFE id; "" without identity
    ("ns exact", Match(namespaces=(exact("demo"),)), conn(), True),
    ("ns exact other", Match(namespaces=(exact("prod"),)), conn(), False),
    ("ns is the identity's, not the trust domain", Match(namespaces=(exact("cluster.local"),)), conn(), False),
    ("ns prefix", Match(namespaces=(prefix("de"),)), conn(), True),
    ("ns suffix", Match(namespaces=(suffix("mo"),)), conn(), True),
    ("ns presence", Match(namespaces=(PRESENCE,)), conn(), True),
    ("ns presence without identity", Match(namespaces=(PRESENCE,)), conn(ident=None), False),
    ("ns exact '' matches no identity", Match(namespaces=(exact(""),)), conn(ident=None), True),
    ("ns any of values", Match(namespaces=(exact("x"), exact("prod"))), conn(ident=OTHER), True),
    ("not ns: listed", Match(not_namespaces=(exact("demo"),)), conn(), False),
    ("not ns: unlisted", Match(not_namespaces=(exact("prod"),)), conn(), True),
    ("not ns: one of several listed", Match(not_namespaces=(exact("prod"), prefix("d"))), conn(), False),
    ("not ns without identity", Match(not_namespaces=(exact("demo"),)), conn(ident=None), True),
    # principals: the id without spiffe://
    ("principal exact", Match(principals=(exact("cluster.local/ns/demo/sa/sleep"),)), conn(), True),
    ("principal exact with scheme never matches", Match(principals=(exact("spiffe://cluster.local/ns/demo/sa/sleep"),)),
     conn(), False),
    ("principal exact other sa", Match(principals=(exact("cluster.local/ns/demo/sa/other"),)), conn(), False),
    ("principal prefix", Match(principals=(prefix("cluster.local/ns/demo/"),)), conn(), True),
    ("principal prefix other td", Match(principals=(prefix("example.org/"),)), conn(), False),
    ("principal suffix", Match(principals=(suffix("/sa/sleep"),)), conn(), True),
    ("principal suffix miss", Match(principals=(suffix("/sa/sleepy"),)), conn(), False),
    ("principal presence", Match(principals=(PRESENCE,)), conn(), True),
    ("principal presence without identity", Match(principals=(PRESENCE,)), conn(ident=None), False),
    ("principal exact '' without identity", Match(principals=(exact(""),)), conn(ident=None), False),
    ("principal prefix '' without identity", Match(principals=(prefix(""),)), conn(ident=None), False),
    ("principal prefix '' with identity", Match(principals=(prefix(""),)), conn(), True),
    ("not principal listed", Match(not_principals=(exact("cluster.local/ns/demo/sa/sleep"),)), conn(), False),
    ("not principal unlisted", Match(not_principals=(exact("cluster.local/ns/demo/sa/x"),)), conn(), True),
    ("not principal presence with identity", Match(not_principals=(PRESENCE,)), conn(), False),
    ("not principal presence without identity", Match(not_principals=(PRESENCE,)), conn(ident=None), True),
    ("not principal prefix without identity", Match(not_principals=(prefix("cluster.local/"),)), conn(ident=None),
     True),
    # service accounts: ns + sa of the identity (trust domain ignored)
    ("sa match", Match(service_accounts=(ServiceAccountMatch("demo", "sleep"),)), conn(), True),
    ("sa other td same ns/sa", Match(service_accounts=(ServiceAccountMatch("prod", "api"),)), conn(ident=OTHER),
     True),
    ("sa wrong sa", Match(service_accounts=(ServiceAccountMatch("demo", "api"),)), conn(), False),
    ("sa wrong ns", Match(service_accounts=(ServiceAccountMatch("prod", "sleep"),)), conn(), False),
    ("sa any of", Match(service_accounts=(ServiceAccountMatch("x", "y"), ServiceAccountMatch("demo", "sleep"))),
     conn(), True),
    ("sa without identity", Match(service_accounts=(ServiceAccountMatch("demo", "sleep"),)), conn(ident=None),
     False),
    ("not sa listed", Match(not_service_accounts=(ServiceAccountMatch("demo", "sleep"),)), conn(), False),
    ("not sa unlisted", Match(not_service_accounts=(ServiceAccountMatch("demo", "x"),)), conn(), True),
    ("not sa without identity", Match(not_service_accounts=(ServiceAccountMatch("demo", "sleep"),)),
     conn(ident=None), True),
    # source IPs
    ("src v4 cidr", Match(source_ips=net("10.0.0.0/8")), conn(src="10.9.8.7"), True),
    ("src v4 cidr miss", Match(source_ips=net("10.0.0.0/8")), conn(src="11.0.0.1"), False),
    ("src v4 host", Match(source_ips=net("10.0.0.1/32")), conn(src="10.0.0.1"), True),
    ("src v4 host miss", Match(source_ips=net("10.0.0.1/32")), conn(src="10.0.0.3"), False),
    ("src any of", Match(source_ips=net("192.168.0.0/16", "10.0.0.0/24")), conn(src="10.0.0.9"), True),
    ("src v4 0/0", Match(source_ips=net("0.0.0.0/0")), conn(src="203.0.113.5"), True),
    ("src v4 cidr vs v6 peer", Match(source_ips=net("0.0.0.0/0")), conn(src="2001:db8::1"), False),
    ("src v6 cidr", Match(source_ips=net("2001:db8::/32")), conn(src="2001:db8:1::5"), True),
    ("src v6 cidr miss", Match(source_ips=net("2001:db8::/32")), conn(src="2001:db9::5"), False),
    ("src v6 ::/0 vs v4 peer", Match(source_ips=net("::/0")), conn(src="10.0.0.1"), True),
    ("src v6 cidr vs v4 peer", Match(source_ips=net("2001:db8::/32")), conn(src="10.0.0.1"), False),
    ("src mapped peer vs v4 cidr", Match(source_ips=net("10.0.0.0/8")), conn(src="::ffff:10.1.2.3"), True),
    ("src mapped peer vs v4 cidr miss", Match(source_ips=net("10.0.0.0/8")), conn(src="::ffff:11.1.2.3"), False),
    ("src mapped cidr vs v4 peer", Match(source_ips=net("::ffff:10.0.0.0/104")), conn(src="10.1.2.3"), True),
    ("src mapped cidr vs v4 peer miss", Match(source_ips=net("::ffff:10.0.0.0/104")), conn(src="11.1.2.3"), False),
    ("src mapped cidr vs mapped peer", Match(source_ips=net("::ffff:10.0.0.0/104")), conn(src="::ffff:10.0.0.1"),
     True),
    ("src mapped host", Match(source_ips=net("::ffff:10.0.0.1/128")), conn(src="10.0.0.1"), True),
    ("not src listed", Match(not_source_ips=net("10.0.0.0/8")), conn(src="10.0.0.1"), False),
    ("not src unlisted", Match(not_source_ips=net("10.0.0.0/8")), conn(src="172.16.0.1"), True),
    ("not src mapped", Match(not_source_ips=net("10.0.0.0/8")), conn(src="::ffff:10.0.0.1"), False),
    ("not src v6", Match(not_source_ips=net("fd00::/8")), conn(src="fd00::1"), False),
    # destination IPs: the destination workload IP
    ("dst v4 cidr", Match(destination_ips=net("10.0.0.0/30")), conn(dst="10.0.0.2"), True),
    ("dst v4 cidr miss", Match(destination_ips=net("10.0.0.0/31")), conn(dst="10.0.0.2"), False),
    ("dst is not src", Match(destination_ips=net("10.0.0.1/32")), conn(src="10.0.0.1", dst="10.0.0.2"), False),
    ("dst v6", Match(destination_ips=net("fd00::/64")), conn(dst="fd00::2"), True),
    ("dst v6 miss", Match(destination_ips=net("fd00::/64")), conn(dst="fd00:0:0:1::2"), False),
    ("dst mapped peer", Match(destination_ips=net("10.0.0.2/32")), conn(dst="::ffff:10.0.0.2"), True),
    ("dst mapped cidr", Match(destination_ips=net("::ffff:10.0.0.0/120")), conn(dst="10.0.0.2"), True),
    ("not dst listed", Match(not_destination_ips=net("10.0.0.2/32")), conn(dst="10.0.0.2"), False),
    ("not dst unlisted", Match(not_destination_ips=net("10.0.0.3/32")), conn(dst="10.0.0.2"), True),
    ("not dst mapped cidr", Match(not_destination_ips=net("::ffff:10.0.0.0/104")), conn(dst="10.0.0.2"), False),
    # destination ports: the TARGET port
    ("port match", Match(destination_ports=(8080,)), conn(port=8080), True),
    ("port any of", Match(destination_ports=(80, 8080)), conn(port=8080), True),
    ("port miss", Match(destination_ports=(8080,)), conn(port=8081), False),
    ("not port listed", Match(not_destination_ports=(8080,)), conn(port=8080), False),
    ("not port unlisted", Match(not_destination_ports=(8080,)), conn(port=80), True),
    ("not port one of", Match(not_destination_ports=(80, 8080)), conn(port=80), False),
    # several field types AND-ed
    ("all fields hold", Match(namespaces=(exact("demo"),), principals=(suffix("/sleep"),),
                              service_accounts=(ServiceAccountMatch("demo", "sleep"),),
                              source_ips=net("10.0.0.0/24"), destination_ips=net("10.0.0.2/32"),
                              destination_ports=(80,), not_destination_ports=(81,),
                              not_namespaces=(exact("prod"),)), conn(), True),
    ("all but one field hold", Match(namespaces=(exact("demo"),), principals=(suffix("/sleep"),),
                                     service_accounts=(ServiceAccountMatch("demo", "sleep"),),
                                     source_ips=net("10.0.0.0/24"), destination_ips=net("10.0.0.3/32"),
                                     destination_ports=(80,)), conn(), False),
]


@pytest.mark.parametrize("match,connection,expected", [m[1:] for m in MATCH_FIELDS], ids=[m[0] for m in MATCH_FIELDS])
def test_match_fields(match, connection, expected):
    assert matches(pol("p", match=match), connection) is expected


def test_target_port_semantics():
    """The decision sees the target port: a policy on the service port (8000) does not match a
    connection whose target port is 80, and a policy on 80 does; 15008 is never the port."""
    p_svc = pol("svc", match=Match(destination_ports=(8000,)))
    p_tgt = pol("tgt", match=Match(destination_ports=(80,)))
    c = conn(port=80)  # client dialled the service on 8000, translated to target 80
    assert evaluate([p_svc], c).allowed is False
    assert evaluate([p_tgt], c) == Decision(True, ALLOWED, "demo/tgt")
    assert evaluate([pol("h", match=Match(destination_ports=(15008,)))], c).allowed is False


def test_connection_is_canonical():
    c = conn(src="::ffff:10.0.0.1", dst="::ffff:10.0.0.2")
    assert c.src_ip == IPv4Address("10.0.0.1") and c.dst_ip == IPv4Address("10.0.0.2")
    assert c == conn()


@pytest.mark.parametrize("cidr,expected", [
    ("10.0.0.0/8", ["10.0.0.0/8"]),
    ("2001:db8::/32", ["2001:db8::/32"]),
    ("::ffff:10.0.0.0/104", ["10.0.0.0/8"]),
    ("::ffff:10.0.0.1/128", ["10.0.0.1/32"]),
    ("::ffff:0:0/96", ["0.0.0.0/0"]),
    ("::/0", ["::/0", "0.0.0.0/0"]),
])
def test_canonical_network(cidr, expected):
    assert [str(n) for n in canonical_network(ip_network(cidr))] == expected


# --- STRICT and port-level PERMISSIVE, as istiod converts PeerAuthentication -----------------------

def strict(scope=Scope.GLOBAL, ns="istio-system", name="istio_converted_static_strict", ports=()):
    return Authorization(name, ns, scope, DENY, one(Match(not_principals=(PRESENCE,), not_destination_ports=ports)))


@pytest.mark.parametrize("policy", [strict(), strict(Scope.WORKLOAD_SELECTOR, "demo", "converted_peer_authentication_p")],
                         ids=["global", "selector"])
@pytest.mark.parametrize("ident", [SLEEP, OTHER, Identity("td", "x", "y")])
def test_strict_allows_any_mtls_identity(policy, ident):
    assert evaluate([policy], conn(ident=ident)) == Decision(True, ALLOWED, None)


@pytest.mark.parametrize("policy", [strict(), strict(Scope.WORKLOAD_SELECTOR, "demo", "converted_peer_authentication_p")],
                         ids=["global", "selector"])
def test_strict_denies_plaintext(policy):
    d = evaluate([policy], conn(ident=None, port=8080))
    assert d == Decision(False, f"explicitly denied by: {policy.key}", policy.key)


def test_port_level_permissive_exception():
    p = strict(Scope.WORKLOAD_SELECTOR, "demo", "converted_peer_authentication_p", ports=(9090,))
    assert evaluate([p], conn(ident=None, port=9090)).allowed  # PERMISSIVE port: plaintext passes
    assert not evaluate([p], conn(ident=None, port=8080)).allowed  # other ports stay STRICT
    assert evaluate([p], conn(ident=SLEEP, port=8080)).allowed


def test_strict_with_allow_policy():
    allow_demo = pol("allow-demo", match=Match(namespaces=(exact("demo"),)))
    assert evaluate([strict(), allow_demo], conn(ident=SLEEP)) == Decision(True, ALLOWED, "demo/allow-demo")
    assert evaluate([strict(), allow_demo], conn(ident=OTHER)) == Decision(False, NOT_ALLOWED, None)
    assert not evaluate([strict(), allow_demo], conn(ident=None)).allowed


# --- scopes and the index -------------------------------------------------------------------------

def wl(ns="demo", keys=(), name="w"):
    return Workload(uid=name, name=name, namespace=ns, workload_ips=(IPv4Address("10.0.0.2"),),
                    authorization_policies=tuple(keys))


NS_DEMO = pol("deny-demo", DENY, ns="demo")
NS_PROD = pol("deny-prod", DENY, ns="prod")
GLOBAL = pol("deny-global", DENY, ns="istio-system", scope=Scope.GLOBAL)
SEL = pol("deny-sel", DENY, ns="demo", scope=Scope.WORKLOAD_SELECTOR)


def test_namespace_policy_applies_only_in_its_namespace():
    index = PolicyIndex.build([NS_DEMO, NS_PROD])
    assert index.applicable(wl("demo")) == (NS_DEMO,)
    assert index.applicable(wl("prod")) == (NS_PROD,)
    assert index.applicable(wl("other")) == ()
    assert authorize(index, wl("demo"), conn()).policy == "demo/deny-demo"
    assert authorize(index, wl("other"), conn()) == Decision(True, ALLOWED, None)


def test_global_policy_applies_everywhere():
    index = PolicyIndex.build([GLOBAL])
    for ns in ("demo", "prod", "istio-system", ""):
        assert index.applicable(wl(ns)) == (GLOBAL,)
        assert authorize(index, wl(ns), conn()).reason == "explicitly denied by: istio-system/deny-global"


def test_selector_policy_applies_only_to_listing_workloads():
    index = PolicyIndex.build([SEL])
    assert index.applicable(wl("demo")) == ()  # same namespace, not listed
    assert index.applicable(wl("demo", ["demo/deny-sel"])) == (SEL,)
    assert authorize(index, wl("demo"), conn()).allowed
    assert not authorize(index, wl("demo", ["demo/deny-sel"]), conn()).allowed


def test_unknown_selector_keys_are_skipped_and_reported():
    index = PolicyIndex.build([SEL])
    w = wl("demo", ["demo/gone", "demo/deny-sel", "x/y"])
    assert index.applicable(w) == (SEL,)
    assert index.unknown_keys(w) == ("demo/gone", "x/y")
    assert index.unknown_keys(wl("demo", ["demo/deny-sel"])) == ()
    assert authorize(index, wl("demo", ["demo/gone"]), conn()) == Decision(True, ALLOWED, None)


def test_applicable_order_and_no_duplicates():
    index = PolicyIndex.build([SEL, GLOBAL, NS_PROD, NS_DEMO])
    w = wl("demo", ["demo/deny-sel", "demo/deny-demo", "demo/deny-sel"])  # lists its ns policy too
    assert index.applicable(w) == (NS_DEMO, GLOBAL, SEL)
    # the first matching DENY in applicable order decides
    assert authorize(index, w, conn()).policy == "demo/deny-demo"


def test_later_policy_with_same_key_replaces():
    a = pol("p", DENY)
    b = pol("p", ALLOW)
    index = PolicyIndex.build([a, b])
    assert len(index) == 1 and index.get("demo/p") is b
    assert authorize(index, wl(), conn()) == Decision(True, ALLOWED, "demo/p")


def test_authorize_equals_evaluate_of_applicable():
    policies = [NS_DEMO, NS_PROD, GLOBAL, SEL, pol("a", ns="prod"), pol("b", ns="demo", dry=True, action=DENY)]
    index = PolicyIndex.build(policies)
    for w in (wl("demo"), wl("prod"), wl("demo", ["demo/deny-sel"]), wl("none")):
        for c in (conn(), conn(ident=None)):
            assert authorize(index, w, c) == evaluate(index.applicable(w), c)


def test_from_local_config():
    cfg = parse_local_config("""
workloads:
- {uid: a, name: a, namespace: demo, workloadIps: [10.0.0.2], protocol: HBONE,
   authorizationPolicies: [demo/strict]}
- {uid: b, name: b, namespace: demo, workloadIps: [10.0.0.3], protocol: HBONE}
policies:
- name: strict
  namespace: demo
  scope: WorkloadSelector
  action: Deny
  rules: [[[{notPrincipals: [Presence], notDestinationPorts: [9090]}]]]
- name: allow-sleep
  namespace: demo
  scope: Namespace
  action: Allow
  rules: [[[{principals: [{Exact: cluster.local/ns/demo/sa/sleep}]}], [{destinationPorts: [80, 9090]}]]]
""", "test")
    state = ProxyState.from_local(cfg)
    index = PolicyIndex.build(state.policies())
    a, b = state.workload_by_uid("a"), state.workload_by_uid("b")
    assert authorize(index, a, conn(ident=None, port=80)).reason == "explicitly denied by: demo/strict"
    assert authorize(index, a, conn(ident=SLEEP, port=80)) == Decision(True, ALLOWED, "demo/allow-sleep")
    assert authorize(index, a, conn(ident=SLEEP, port=81)).reason == NOT_ALLOWED
    assert authorize(index, a, conn(ident=None, port=9090)).reason == NOT_ALLOWED  # passes STRICT, no principal
    assert authorize(index, b, conn(ident=None, port=80)).reason == NOT_ALLOWED  # b is not STRICT


# --- properties -----------------------------------------------------------------------------------

def _naive_ip_in(addr, nets):
    """Independent of rbac's integer form: a v4 address matches v4 CIDRs and mapped v6 CIDRs."""
    mapped = IPv6Address(f"::ffff:{addr}") if addr.version == 4 else None
    return any(addr in n or (mapped is not None and mapped in n) for n in nets)


def _naive_str(m, value):
    k = m.kind
    return (value == m.value if k is StringMatchKind.EXACT else value.startswith(m.value)
            if k is StringMatchKind.PREFIX else value.endswith(m.value)
            if k is StringMatchKind.SUFFIX else value != "")


def _naive_matches(policy, c):
    """Reference 6 read literally (like ztunnel's Authorization::matches)."""
    ident = c.src_identity
    ns = ident.namespace if ident else ""

    def field(pos, neg, pred):
        return (not pos or any(map(pred, pos))) and not any(map(pred, neg))

    def match(m):
        return all((
            field(m.namespaces, m.not_namespaces, lambda s: _naive_str(s, ns)),
            field(m.principals, m.not_principals, lambda s: ident is not None and _naive_str(s, ident.principal)),
            field(m.service_accounts, m.not_service_accounts,
                  lambda a: ident is not None and (a.namespace, a.service_account) == (ident.namespace,
                                                                                       ident.service_account)),
            field(m.source_ips, m.not_source_ips, lambda n: _naive_ip_in(c.src_ip, [n])),
            field(m.destination_ips, m.not_destination_ips, lambda n: _naive_ip_in(c.dst_ip, [n])),
            field(m.destination_ports, m.not_destination_ports, lambda p: p == c.dst_port),
        ))

    if not policy.rules:
        return False
    return any(
        all(not clause or any(not m.is_empty and match(m) for m in clause) for clause in rule)
        for rule in policy.rules
    )


def _naive_evaluate(policies, c):
    dry = [p.key for p in policies if p.dry_run and p.action is DENY and _naive_matches(p, c)]
    for p in policies:
        if not p.dry_run and p.action is DENY and _naive_matches(p, c):
            return Decision(False, f"explicitly denied by: {p.key}", p.key, tuple(dry))
    dry += [p.key for p in policies if p.dry_run and p.action is ALLOW and _naive_matches(p, c)]
    allows = [p for p in policies if not p.dry_run and p.action is ALLOW]
    if not allows:
        return Decision(True, ALLOWED, None, tuple(dry))
    for p in allows:
        if _naive_matches(p, c):
            return Decision(True, ALLOWED, p.key, tuple(dry))
    return Decision(False, NOT_ALLOWED, None, tuple(dry))


identities = st.sampled_from([None, SLEEP, OTHER, Identity("cluster.local", "prod", "sleep")])
addresses = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.1.0.1", "::ffff:10.0.0.1", "fd00::1", "2001:db8::1"])
ports = st.sampled_from([80, 443, 8080, 9090])
connections = st.builds(lambda s, d, p, i: conn(s, d, p, i), addresses, addresses, ports, identities)
string_matches = st.one_of(
    st.builds(exact, st.sampled_from(["", "demo", "prod", "cluster.local/ns/demo/sa/sleep"])),
    st.builds(prefix, st.sampled_from(["", "d", "cluster.local/", "example.org/ns/prod"])),
    st.builds(suffix, st.sampled_from(["o", "/sa/sleep", "/sa/api", "od"])),
    st.just(PRESENCE),
)
sas = st.builds(ServiceAccountMatch, st.sampled_from(["demo", "prod"]), st.sampled_from(["sleep", "api"]))
cidrs = st.sampled_from(net("10.0.0.0/8", "10.0.0.1/32", "0.0.0.0/0", "::/0", "fd00::/8",
                            "::ffff:10.0.0.0/104", "::ffff:0:0/96", "2001:db8::/32"))
small = dict(max_size=2)
match_objects = st.builds(
    Match,
    namespaces=st.lists(string_matches, **small).map(tuple),
    not_namespaces=st.lists(string_matches, max_size=1).map(tuple),
    principals=st.lists(string_matches, **small).map(tuple),
    not_principals=st.lists(string_matches, max_size=1).map(tuple),
    service_accounts=st.lists(sas, **small).map(tuple),
    not_service_accounts=st.lists(sas, max_size=1).map(tuple),
    source_ips=st.lists(cidrs, **small).map(tuple),
    not_source_ips=st.lists(cidrs, max_size=1).map(tuple),
    destination_ips=st.lists(cidrs, max_size=1).map(tuple),
    not_destination_ips=st.lists(cidrs, max_size=1).map(tuple),
    destination_ports=st.lists(ports, **small).map(tuple),
    not_destination_ports=st.lists(ports, max_size=1).map(tuple),
) | st.just(Match()) | st.builds(lambda p: Match(destination_ports=(p,)), ports)
rules = st.lists(st.lists(st.lists(match_objects, max_size=3).map(tuple), max_size=3).map(tuple),
                 max_size=3).map(tuple)
policies = st.lists(
    st.builds(lambda i, a, r, d, s: Authorization(f"p{i}", "demo", s, a, r, d),
              st.integers(0, 5), st.sampled_from([ALLOW, DENY]), rules, st.booleans(),
              st.sampled_from(list(Scope))),
    max_size=5,
).map(lambda ps: list({p.key: p for p in ps}.values()))  # keys unique, as in one snapshot


@settings(max_examples=400, deadline=None)
@given(policies, connections)
def test_property_equals_literal_reading_of_the_spec(ps, c):
    assert evaluate(ps, c) == _naive_evaluate(ps, c)


@settings(max_examples=200, deadline=None)
@given(policies, connections)
def test_property_deterministic_and_index_agrees(ps, c):
    first = evaluate(ps, c)
    assert evaluate(ps, c) == first == evaluate(list(ps), c)
    index = PolicyIndex.build(ps)
    w = wl("demo", [p.key for p in ps])  # every scope applies to this workload
    assert {p.key for p in index.applicable(w)} == {p.key for p in ps}
    assert authorize(index, w, c).allowed == first.allowed


@settings(max_examples=200, deadline=None)
@given(policies, connections)
def test_property_dry_run_never_changes_the_outcome(ps, c):
    enforced = [p for p in ps if not p.dry_run]
    d, e = evaluate(ps, c), evaluate(enforced, c)
    assert (d.allowed, d.reason, d.policy) == (e.allowed, e.reason, e.policy)
    assert set(d.dry_run) <= {p.key for p in ps if p.dry_run}


@settings(max_examples=200, deadline=None)
@given(policies, connections, st.sampled_from([((),), (((),),), one(Match(not_destination_ports=(1,)))]))
def test_property_deny_matching_everything_always_denies(ps, c, everything):
    deny_all = Authorization("deny-all", "zz", Scope.GLOBAL, DENY, everything)
    for arranged in ([deny_all, *ps], [*ps, deny_all]):
        d = evaluate(arranged, c)
        assert not d.allowed and d.reason.startswith("explicitly denied by: ")


def test_bench_decision_cost_runs():
    r = bench_decision_cost(n_policies=300, n_decisions=200)
    assert r["decisions"] == 200 and r["policies"] == 300 and r["applicable"] > 5
    assert r["decisions_per_second"] > 0 and r["us_per_decision"] > 0
