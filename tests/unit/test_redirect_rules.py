"""The redirection rule builder (pure): the exact `iptables-save` text of node mode and in-pod mode,
config validation, the backend policy and small parsers.  No sockets, no namespaces."""

from __future__ import annotations

import pytest

from ztunnel_fast.redirect import iptables as ipt
from ztunnel_fast.redirect import rules
from ztunnel_fast.redirect.rules import RedirectConfig

NODE_MANGLE = """\
:ztunnel-PREROUTING - [0:0]
:ztunnel-INPUT - [0:0]
:ztunnel-OUTPUT - [0:0]
-A PREROUTING -j ztunnel-PREROUTING
-A INPUT -j ztunnel-INPUT
-A OUTPUT -j ztunnel-OUTPUT
-A ztunnel-PREROUTING -m mark --mark 0x539/0xfff -j RETURN
-A ztunnel-PREROUTING -m connmark --mark 0x111/0xfff -j MARK --set-xmark 0x111/0xfff
-A ztunnel-PREROUTING -m mark --mark 0x111/0xfff -j RETURN
-A ztunnel-PREROUTING -p tcp -m conntrack ! --ctstate NEW -j RETURN
-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips src -m addrtype ! --dst-type LOCAL -j TPROXY --on-port 15001 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff
-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips dst -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff
-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips dst -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff
-A ztunnel-INPUT -m mark --mark 0x111/0xfff -m connmark --mark 0x0/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ztunnel-OUTPUT -p tcp -m mark --mark 0x539/0xfff -m set --match-set ztunnel-pods-ips dst -m tcp --dport 15008 -j CONNMARK --set-xmark 0x112/0xfff
-A ztunnel-OUTPUT -m connmark --mark 0x112/0xfff -j MARK --set-xmark 0x111/0xfff
-A ztunnel-OUTPUT -p tcp -m mark --mark 0x539/0xfff -m addrtype ! --src-type LOCAL -j CONNMARK --set-xmark 0x111/0xfff"""

NODE_NAT = """\
:ztunnel-PREROUTING - [0:0]
-A PREROUTING -j ztunnel-PREROUTING
-A ztunnel-PREROUTING -m mark --mark 0x111/0xfff -j ACCEPT"""

# istio-cni's cni/pkg/iptables/testdata/tproxy.golden (mark 1337), in iptables-save spelling,
# without the DNS redirect (ztunnel-fast has no DNS proxy)
INPOD_MANGLE = """\
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -i lo -p tcp -j ACCEPT
-A ISTIO_PRERT -p tcp -m tcp --dport 15008 -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15008 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff
-A ISTIO_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"""

INPOD_NAT = """\
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"""


def test_node_mode_text():
    rs = rules.node_ruleset()
    assert rules.render(rs) == {"mangle": NODE_MANGLE.splitlines(), "nat": NODE_NAT.splitlines()}
    assert rs.ipset == "ztunnel-pods-ips"
    assert all(h.first for h in rs.hooks)  # before kube-proxy & co., like 1.18's `-I`


def test_node_mode_policy_routing():
    rs = rules.node_ruleset()
    assert rs.ip_rule.argv() == ["fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"]
    assert rs.local_route.argv() == ["local", "0.0.0.0/0", "dev", "lo", "table", "100"]


def test_inpod_mode_text():
    rs = rules.inpod_ruleset()
    assert rules.render(rs) == {"mangle": INPOD_MANGLE.splitlines(), "nat": INPOD_NAT.splitlines()}
    assert rs.ipset is None
    assert not any(h.first for h in rs.hooks)  # istio-cni appends
    assert rs.ip_rule.argv() == ["fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"]


def test_node_mode_order_invariants():
    pre = [r for r in rules.node_ruleset().rules if r.chain == "ztunnel-PREROUTING" and r.table == "mangle"]
    targets = [r.target for r in pre]
    # skips and the connmark route come before any capture; only NEW connections reach TPROXY
    first_tproxy = targets.index("TPROXY")
    assert targets[first_tproxy:] == ["TPROXY"] * 3
    assert any("ctstate" in o.name and o.negated for r in pre[:first_tproxy] for m in r.matches for o in m.options)
    # outbound (source in the set) wins over inbound (destination in the set): pod -> pod on one node
    ports = [r.target_options[0].values[0] for r in pre[first_tproxy:]]
    assert ports == ["15001", "15008", "15006"]
    assert all(r.why for r in rules.node_ruleset().rules + rules.inpod_ruleset().rules)


def test_config_changes_flow_into_the_text():
    cfg = RedirectConfig(ipset="zt-test", packet_mark=0x100, tproxy_mark=0x222, loop_mark=0x223, route_table=77,
                         rule_priority=1234, outbound_port=25001)
    text = "\n".join(rules.render(rules.node_ruleset(cfg))["mangle"])
    assert "-m mark --mark 0x100/0xfff -j RETURN" in text
    assert "--match-set zt-test src" in text and "ztunnel-pods-ips" not in text
    assert "--on-port 25001 --on-ip 0.0.0.0 --tproxy-mark 0x222/0xfff" in text
    assert "-j CONNMARK --set-xmark 0x223/0xfff" in text
    rs = rules.node_ruleset(cfg)
    assert rs.ip_rule.argv() == ["fwmark", "0x222/0xfff", "pref", "1234", "lookup", "77"]


@pytest.mark.parametrize("kwargs, message", [
    ({"packet_mark": 0x1000}, "packet_mark 0x1000 must be a non-zero value inside mask 0xfff"),
    ({"tproxy_mark": 0}, "tproxy_mark 0x0 must be a non-zero"),
    ({"loop_mark": 0x111}, "marks must differ"),
    ({"packet_mark": 0x111}, "marks must differ"),
    ({"outbound_port": 0}, "bad port 0"),
    ({"route_table": 254}, "route_table must be 1..252"),
    ({"rule_priority": 32766}, "rule_priority"),
    ({"ipset": "a b"}, "bad ipset name"),
    ({"ipset": "x" * 32}, "bad ipset name"),
])
def test_config_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        RedirectConfig(**kwargs)


def test_render_negations_and_flags():
    r = rules.Rule("nat", "C", "REDIRECT", (rules.Opt("to-ports", ("15001",)),), protocol="tcp", src="!10.0.0.1/32",
                   in_iface="!lo", matches=(rules.Match("tcp", (rules.Opt("dport", ("53",), True),)),
                                            rules.Match("set", (rules.Opt("match-set", ("s", "dst"), True),))))
    assert rules.render_rule(r) == ("-A C ! -s 10.0.0.1/32 ! -i lo -p tcp -m tcp ! --dport 53 "
                                    "-m set ! --match-set s dst -j REDIRECT --to-ports 15001")
    assert rules.render_hook(rules.Hook("mangle", "PREROUTING", "C", True)) == "-A PREROUTING -j C"


def test_iptc_values_carry_negation_like_python_iptables_expects():
    assert ipt._value(rules.Opt("mark", ("0x539/0xfff",), True)) == "!0x539/0xfff"
    assert ipt._value(rules.Opt("match-set", ("s", "src"), True)) == ["!", "s", "src"]
    assert ipt._value(rules.Opt("match-set", ("s", "src"))) == ["s", "src"]
    assert ipt._value(rules.Opt("restore-mark")) == ""


SAVE = """\
# Generated by iptables-save v1.8.9
*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p tcp -j ACCEPT
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark
-A ISTIO_OUTPUTX -j RETURN
COMMIT
"""


def test_chain_lines_reads_one_chain_of_one_table():
    assert ipt.chain_lines(SAVE, "nat", "ISTIO_OUTPUT") == ["-A ISTIO_OUTPUT -p tcp -j ACCEPT"]
    assert ipt.chain_lines(SAVE, "mangle", "ISTIO_OUTPUT") == [
        "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark"]
    assert ipt.chain_lines(SAVE, "raw", "ISTIO_OUTPUT") == []


@pytest.mark.parametrize("backends, allow, refused, warned", [
    (ipt.Backends("legacy", 0, 0, ()), False, None, []),
    (ipt.Backends("nf_tables", 3, 0, ()), False, None, ["plain `iptables` on this host is iptables-nft"]),
    (ipt.Backends("nf_tables", 0, 5, ()), False, "5 iptables rule(s) in the nft backend", []),
    (ipt.Backends("nf_tables", 0, 5, ()), True, None, ["5 iptables rule(s) in the nft backend",
                                                      "plain `iptables` on this host is iptables-nft"]),
    (ipt.Backends("legacy", 0, 2, ("ztunnel-PREROUTING",)), True,
     "ztunnel-PREROUTING already exist in the iptables-nft backend", []),
])
def test_backend_policy(backends, allow, refused, warned):
    refusal, warnings = ipt.backend_problem(backends, allow_nft=allow)
    if refused is None:
        assert refusal is None
    else:
        assert refused in refusal and "legacy" in refusal
    assert len(warnings) == len(warned)
    for w, expect in zip(warnings, warned):
        assert expect in w
