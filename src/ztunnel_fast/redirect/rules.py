"""The redirection rules as data: what to install for node mode and for in-pod mode (pure).

Role: from a small :class:`RedirectConfig` (marks, ports, ipset name, route table), build the
ordered iptables rules, the chains they live in, the jumps that hook those chains into the
built-in chains, and the policy routing, as plain values.  `redirect/iptables.py` applies them
with python-iptables, `redirect/routes.py` and `redirect/ipset.py` do the rest; the unit tests
compare :func:`render` with the expected `iptables-save` text, and the end-to-end tests compare
it with what `iptables-save` prints inside the namespace.

Marks (all under mask 0xfff, the range Istio uses, so other software's bits are left alone):

=========  ========  =================================================================================
value      on        meaning
=========  ========  =================================================================================
``0x539``  packet    PACKET_MARK (1337): every socket ztunnel-fast opens toward a workload. Never
                     captured again.
``0x111``  packet    "deliver to ztunnel-fast": ``ip rule fwmark 0x111/0xfff lookup 100`` with
                     ``local 0.0.0.0/0 dev lo`` in table 100. Also TPROXY's ``--tproxy-mark``.
``0x111``  conntrack a connection that ends in ztunnel-fast: captured by TPROXY (remembered on its
                     first packet in ``ztunnel-INPUT``) or dialled by ztunnel-fast with the client's
                     source IP (``ztunnel-OUTPUT``). Packets of it that enter PREROUTING from outside
                     (the pod's next packets; the app's replies) get mark 0x111, so they go to
                     ztunnel-fast's socket instead of being forwarded.
``0x112``  conntrack ztunnel-fast's own HBONE to a pod of this node: both directions loop through
                     ``lo`` (OUTPUT sets mark 0x111), so the dial lands on our own 15008 listener
                     and the answers come back to the dialling socket even with a spoofed source.
=========  ========  =================================================================================

Node mode (the guide's model, Istio 1.18 semantics with in-pod style marks): ztunnel-fast in
`shared` mode runs in the node's network namespace; the ipset ``ztunnel-pods-ips`` holds the
node's ambient pod IPs; mangle chains ``ztunnel-PREROUTING``/``-INPUT``/``-OUTPUT`` capture with
TPROXY: TCP from a member to anything but the node itself -> 15001; TCP to a member on 15008 ->
15008; any other TCP to a member -> 15006.

In-pod mode (Istio >= 1.21): istio-cni's TPROXY rules for a pod network namespace
(`cni/pkg/iptables/testdata/tproxy.golden`), without the DNS rule (ztunnel-fast has no DNS proxy).

Invariants:
- Only new connections are captured (``! --ctstate NEW -> RETURN`` before the TPROXY rules): a
  pod added to the set keeps its open connections as they were, and a pod removed from it keeps
  its captured ones (conntrack remembers them).  Adding or removing one IP never touches another.
- Traffic that originates in the node's own network namespace never enters PREROUTING there, so
  the node's own traffic is never captured; ztunnel-fast's marked packets are skipped everywhere.
- Every chain named here is owned by ztunnel-fast: install flushes and rewrites it, uninstall
  removes it.  Nothing else is touched but the single jump that hooks it into a built-in chain.
- IPv4 only (the ipset is ``family inet``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

__all__ = [
    "INPOD_CHAINS",
    "NODE_CHAINS",
    "Hook",
    "IpRule",
    "LocalRoute",
    "Match",
    "Opt",
    "RedirectConfig",
    "Rule",
    "RuleSet",
    "inpod_ruleset",
    "node_ruleset",
    "render",
    "render_hook",
    "render_rule",
]

MANGLE, NAT = "mangle", "nat"

# Chain names.  Node mode keeps the 1.18 names the guide lists (`iptables -t mangle -L
# ztunnel-PREROUTING`); in-pod mode keeps istio-cni's, so Istio's own tooling recognises them.
NODE_PREROUTING = "ztunnel-PREROUTING"
NODE_INPUT = "ztunnel-INPUT"
NODE_OUTPUT = "ztunnel-OUTPUT"
NODE_CHAINS = ((MANGLE, NODE_PREROUTING), (MANGLE, NODE_INPUT), (MANGLE, NODE_OUTPUT), (NAT, NODE_PREROUTING))
INPOD_PRERT = "ISTIO_PRERT"
INPOD_OUTPUT = "ISTIO_OUTPUT"
INPOD_CHAINS = ((MANGLE, INPOD_PRERT), (MANGLE, INPOD_OUTPUT), (NAT, INPOD_OUTPUT))


@dataclass(frozen=True)
class RedirectConfig:
    ipset: str = "ztunnel-pods-ips"  # node mode: the node's ambient pod IPs (hash:ip)
    packet_mark: int = 0x539  # PACKET_MARK (1337) on ztunnel-fast's sockets toward workloads
    tproxy_mark: int = 0x111  # "deliver to ztunnel-fast" (Istio's InpodTProxyMark)
    loop_mark: int = 0x112  # conntrack: ztunnel-fast's HBONE to a pod of its own node
    mask: int = 0xfff  # the bits the marks above live in (Istio's mask)
    outbound_port: int = 15001
    inbound_port: int = 15008  # HBONE
    inbound_plaintext_port: int = 15006
    route_table: int = 100  # holds `local 0.0.0.0/0 dev lo` (Istio's RouteTableInbound)
    rule_priority: int = 32764  # the `ip rule` for tproxy_mark, just before `lookup main`
    probe_ip: str = "169.254.7.127"  # in-pod: kubelet probes arrive SNATed to this (istio-cni)

    def __post_init__(self) -> None:
        marks = {"packet_mark": self.packet_mark, "tproxy_mark": self.tproxy_mark, "loop_mark": self.loop_mark}
        for name, value in marks.items():
            if not 0 < value <= self.mask or value & ~self.mask:
                raise ValueError(f"{name} {value:#x} must be a non-zero value inside mask {self.mask:#x}")
        if len(set(marks.values())) != len(marks):
            raise ValueError(f"marks must differ: {', '.join(f'{k}={v:#x}' for k, v in marks.items())}")
        for port in (self.outbound_port, self.inbound_port, self.inbound_plaintext_port):
            if not 0 < port < 65536:
                raise ValueError(f"bad port {port}")
        if not 0 < self.route_table < 253 or not 0 < self.rule_priority < 32766:
            raise ValueError("route_table must be 1..252 and rule_priority 1..32765 (before `lookup main`)")
        if not self.ipset or len(self.ipset) > 31 or any(c.isspace() for c in self.ipset):
            raise ValueError(f"bad ipset name {self.ipset!r} (1..31 characters, no spaces)")
        ipaddress.IPv4Address(self.probe_ip)

    def m(self, value: int) -> str:
        """A mark as iptables prints it: ``0x539/0xfff``."""
        return f"{value:#x}/{self.mask:#x}"


# ------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class Opt:
    """One option of a match or target: ``[!] --name v1 v2``."""

    name: str  # without dashes: "mark", "match-set", "on-port"
    values: tuple[str, ...] = ()  # () for flags such as --restore-mark
    negated: bool = False


@dataclass(frozen=True)
class Match:
    """``-m module <options>``."""

    module: str
    options: tuple[Opt, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One rule appended to one of our chains.  Address and interface fields take a leading
    ``!`` for negation (python-iptables' convention)."""

    table: str
    chain: str
    target: str
    target_options: tuple[Opt, ...] = ()
    protocol: str | None = None
    src: str | None = None
    dst: str | None = None
    in_iface: str | None = None
    out_iface: str | None = None
    matches: tuple[Match, ...] = ()
    why: str = field(default="", compare=False)  # documentation; not installed


@dataclass(frozen=True)
class Hook:
    """The jump that hooks one of our chains into a built-in chain."""

    table: str
    builtin: str  # PREROUTING, INPUT, OUTPUT
    chain: str  # ours
    first: bool  # True: inserted at position 1 (runs before other software's rules); else appended


@dataclass(frozen=True)
class IpRule:
    """``ip rule add fwmark <mark>/<mask> pref <priority> lookup <table>``."""

    priority: int
    fwmark: int
    mask: int
    table: int

    def argv(self) -> list[str]:
        return ["fwmark", f"{self.fwmark:#x}/{self.mask:#x}", "pref", str(self.priority), "lookup", str(self.table)]


@dataclass(frozen=True)
class LocalRoute:
    """``ip route add local 0.0.0.0/0 dev lo table <table>``: everything that reaches this table is
    delivered locally (to the TPROXY-assigned or transparent socket)."""

    table: int

    def argv(self) -> list[str]:
        return ["local", "0.0.0.0/0", "dev", "lo", "table", str(self.table)]


@dataclass(frozen=True)
class RuleSet:
    mode: str  # "node" | "inpod"
    chains: tuple[tuple[str, str], ...]  # (table, chain) we own, in creation order
    hooks: tuple[Hook, ...]
    rules: tuple[Rule, ...]
    ip_rule: IpRule
    local_route: LocalRoute
    ipset: str | None  # node mode: the set the rules reference (must exist before the rules)

    def tables(self) -> list[str]:
        return list(dict.fromkeys(t for t, _ in self.chains))


# ------------------------------------------------------------------------------- small builders


def _mark(value: str, negated: bool = False) -> Match:
    return Match("mark", (Opt("mark", (value,), negated),))


def _connmark(value: str) -> Match:
    return Match("connmark", (Opt("mark", (value,)),))


def _set(name: str, direction: str) -> Match:
    return Match("set", (Opt("match-set", (name, direction)),))


def _dport(port: int, negated: bool = False) -> Match:
    return Match("tcp", (Opt("dport", (str(port),), negated),))


def _addrtype(direction: str, kind: str, negated: bool) -> Match:
    return Match("addrtype", (Opt(f"{direction}-type", (kind,), negated),))


def _tproxy(cfg: RedirectConfig, port: int) -> tuple[Opt, ...]:
    # --on-ip 0.0.0.0: the listener is looked up on the packet's destination, which finds
    # ztunnel-fast's wildcard listener (iptables-save prints the default explicitly).
    return (Opt("on-port", (str(port),)), Opt("on-ip", ("0.0.0.0",)), Opt("tproxy-mark", (cfg.m(cfg.tproxy_mark),)))


def _set_xmark(cfg: RedirectConfig, value: int) -> tuple[Opt, ...]:
    return (Opt("set-xmark", (cfg.m(value),)),)


# -------------------------------------------------------------------------------------- rulesets


def node_ruleset(cfg: RedirectConfig = RedirectConfig()) -> RuleSet:
    """Node-level redirection for a `shared` ztunnel-fast in the node's network namespace."""
    zt, to_zt, loop = cfg.m(cfg.packet_mark), cfg.m(cfg.tproxy_mark), cfg.m(cfg.loop_mark)
    pre, inp, out = NODE_PREROUTING, NODE_INPUT, NODE_OUTPUT
    R = Rule
    rules = (
        # ---- PREROUTING: packets arriving from pods, other nodes, or looped through lo
        R(MANGLE, pre, "RETURN", matches=(_mark(zt),),
          why="ztunnel-fast's own packets (looped through lo): never captured"),
        R(MANGLE, pre, "MARK", _set_xmark(cfg, cfg.tproxy_mark), matches=(_connmark(to_zt),),
          why="a connection that ends in ztunnel-fast (captured earlier, or dialled by it with the "
              "client's source): route its packets to the local socket"),
        R(MANGLE, pre, "RETURN", matches=(_mark(to_zt),),
          why="already on its way to ztunnel-fast"),
        R(MANGLE, pre, "RETURN", protocol="tcp", matches=(Match("conntrack", (Opt("ctstate", ("NEW",), True),)),),
          why="never take over a connection mid-flow: only new connections are captured"),
        R(MANGLE, pre, "TPROXY", _tproxy(cfg, cfg.outbound_port), protocol="tcp",
          matches=(_set(cfg.ipset, "src"), _addrtype("dst", "LOCAL", True)),
          why="outbound: TCP from an ambient pod to anything but this node"),
        R(MANGLE, pre, "TPROXY", _tproxy(cfg, cfg.inbound_port), protocol="tcp",
          matches=(_set(cfg.ipset, "dst"), _dport(cfg.inbound_port)),
          why="inbound HBONE to an ambient pod"),
        R(MANGLE, pre, "TPROXY", _tproxy(cfg, cfg.inbound_plaintext_port), protocol="tcp",
          matches=(_set(cfg.ipset, "dst"),),
          why="inbound plaintext to an ambient pod, any other port"),
        # ---- INPUT: remember what TPROXY delivered (its first packet carries --tproxy-mark)
        R(MANGLE, inp, "CONNMARK", _set_xmark(cfg, cfg.tproxy_mark),
          matches=(_mark(to_zt), _connmark(cfg.m(0))),
          why="a captured connection: its next packets follow the connmark, not the ipset"),
        # ---- OUTPUT: ztunnel-fast's own connections
        R(MANGLE, out, "CONNMARK", _set_xmark(cfg, cfg.loop_mark), protocol="tcp",
          matches=(_mark(zt), _set(cfg.ipset, "dst"), _dport(cfg.inbound_port)),
          why="HBONE from ztunnel-fast to a pod of this node: a connection to itself"),
        R(MANGLE, out, "MARK", _set_xmark(cfg, cfg.tproxy_mark), matches=(_connmark(loop),),
          why="both directions of it go through lo to the local sockets"),
        R(MANGLE, out, "CONNMARK", _set_xmark(cfg, cfg.tproxy_mark), protocol="tcp",
          matches=(_mark(zt), _addrtype("src", "LOCAL", True)),
          why="dialled with the client's source IP (IP_TRANSPARENT): the replies come back here"),
        # ---- nat PREROUTING: captured traffic keeps its original destination
        R(NAT, pre, "ACCEPT", matches=(_mark(to_zt),),
          why="skip kube-proxy's service DNAT for captured packets: ztunnel-fast resolves service "
              "VIPs itself (client-side round robin), as 1.18's 0x100 rule did"),
    )
    hooks = (
        Hook(MANGLE, "PREROUTING", pre, first=True),
        Hook(MANGLE, "INPUT", inp, first=True),
        Hook(MANGLE, "OUTPUT", out, first=True),
        Hook(NAT, "PREROUTING", pre, first=True),
    )
    return RuleSet("node", NODE_CHAINS, hooks, rules, _ip_rule(cfg), LocalRoute(cfg.route_table), cfg.ipset)


def inpod_ruleset(cfg: RedirectConfig = RedirectConfig()) -> RuleSet:
    """istio-cni's in-pod rules (TPROXY flavour, no DNS capture) for a pod network namespace in
    which a `dedicated` ztunnel-fast listens."""
    zt, to_zt = cfg.m(cfg.packet_mark), cfg.m(cfg.tproxy_mark)
    probe = f"{cfg.probe_ip}/32"
    R = Rule
    rules = (
        R(MANGLE, INPOD_PRERT, "CONNMARK", _set_xmark(cfg, cfg.tproxy_mark), matches=(_mark(zt),),
          why="ztunnel-fast's dials to the app (through lo): the app's replies go back to it"),
        R(MANGLE, INPOD_PRERT, "ACCEPT", protocol="tcp", src=probe, matches=(Match("tcp"),),
          why="kubelet probes (SNATed to the probe address on the host) bypass ztunnel-fast"),
        R(MANGLE, INPOD_PRERT, "ACCEPT", protocol="tcp", dst="!127.0.0.1/32", in_iface="lo",
          why="traffic within the pod"),
        R(MANGLE, INPOD_PRERT, "TPROXY", _tproxy(cfg, cfg.inbound_port), protocol="tcp",
          matches=(_dport(cfg.inbound_port), _mark(zt, negated=True)),
          why="inbound HBONE"),
        R(MANGLE, INPOD_PRERT, "ACCEPT", protocol="tcp",
          matches=(Match("conntrack", (Opt("ctstate", ("RELATED,ESTABLISHED",)),)),),
          why="never take over a connection mid-flow"),
        R(MANGLE, INPOD_PRERT, "TPROXY", _tproxy(cfg, cfg.inbound_plaintext_port), protocol="tcp",
          dst="!127.0.0.1/32", matches=(_mark(zt, negated=True),),
          why="inbound plaintext, any other port"),
        R(MANGLE, INPOD_OUTPUT, "CONNMARK",
          (Opt("restore-mark"), Opt("nfmask", ("0xffffffff",)), Opt("ctmask", ("0xffffffff",))),
          matches=(_connmark(to_zt),),
          why="the app's replies to a connection ztunnel-fast dialled: policy-routed back to it"),
        R(NAT, INPOD_OUTPUT, "ACCEPT", protocol="tcp", dst=probe, matches=(Match("tcp"),),
          why="replies to kubelet probes"),
        R(NAT, INPOD_OUTPUT, "ACCEPT", protocol="tcp", matches=(_mark(to_zt),),
          why="replies routed back to ztunnel-fast are not outbound connections"),
        R(NAT, INPOD_OUTPUT, "ACCEPT", dst="!127.0.0.1/32", out_iface="lo",
          why="the pod talking to itself"),
        R(NAT, INPOD_OUTPUT, "REDIRECT", (Opt("to-ports", (str(cfg.outbound_port),)),), protocol="tcp",
          dst="!127.0.0.1/32", matches=(_mark(zt, negated=True),),
          why="outbound: every other TCP connection the pod opens"),
    )
    hooks = (
        Hook(MANGLE, "PREROUTING", INPOD_PRERT, first=False),
        Hook(MANGLE, "OUTPUT", INPOD_OUTPUT, first=False),
        Hook(NAT, "OUTPUT", INPOD_OUTPUT, first=False),
    )
    return RuleSet("inpod", INPOD_CHAINS, hooks, rules, _ip_rule(cfg), LocalRoute(cfg.route_table), None)


def _ip_rule(cfg: RedirectConfig) -> IpRule:
    return IpRule(cfg.rule_priority, cfg.tproxy_mark, cfg.mask, cfg.route_table)


# --------------------------------------------------------------------------------------- render


def _render_opt(opt: Opt) -> str:
    head = f"! --{opt.name}" if opt.negated else f"--{opt.name}"
    return " ".join((head, *opt.values))


def _addr(flag: str, value: str | None) -> list[str]:
    if not value:
        return []
    if value.startswith("!"):
        return ["!", flag, value[1:]]
    return [flag, value]


def render_rule(rule: Rule) -> str:
    """The rule exactly as `iptables-save` prints it (``-A chain ...``)."""
    parts = ["-A", rule.chain]
    parts += _addr("-s", rule.src) + _addr("-d", rule.dst)
    parts += _addr("-i", rule.in_iface) + _addr("-o", rule.out_iface)
    if rule.protocol:
        parts += ["-p", rule.protocol]
    for m in rule.matches:
        parts += ["-m", m.module, *(_render_opt(o) for o in m.options)]
    parts += ["-j", rule.target, *(_render_opt(o) for o in rule.target_options)]
    return " ".join(parts)


def render_hook(hook: Hook) -> str:
    return f"-A {hook.builtin} -j {hook.chain}"


def render(ruleset: RuleSet) -> dict[str, list[str]]:
    """Per table, the lines `iptables-save` shows for our chains: ``:chain - [0:0]`` headers, the
    hooks, then our rules in order (other software's lines are not part of this)."""
    out: dict[str, list[str]] = {}
    for table in ruleset.tables():
        lines = [f":{c} - [0:0]" for t, c in ruleset.chains if t == table]
        lines += [render_hook(h) for h in ruleset.hooks if h.table == table]
        lines += [render_rule(r) for r in ruleset.rules if r.table == table]
        out[table] = lines
    return out
