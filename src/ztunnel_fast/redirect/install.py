"""Install, remove, inspect and reconcile redirection in the current network namespace.

Role: the sequence that ties the pieces together (rules.py decides, ipset.py / routes.py /
iptables.py do), used by the `ztunnel-fast redirect` commands after they entered the target
namespace.

Order, and why:
- install: backend check -> ipset (the rules reference it) -> policy routing (so that a packet
  marked "to ztunnel-fast" always has its route) -> iptables (one commit per table);
- uninstall: iptables first (nothing gets marked any more) -> policy routing -> ipset (now
  unreferenced).  Each step is idempotent, so a failed run is finished by running it again.
- sync touches ipset members only, one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import ipset, iptables, routes
from .rules import RedirectConfig, RuleSet, inpod_ruleset, node_ruleset
from .selection import Inventory, ambient_pod_ips, plan

__all__ = ["RedirectError", "Report", "install", "ruleset_for", "status", "sync_once", "uninstall"]


DEFAULT_CONFIG = RedirectConfig()


class RedirectError(RuntimeError):
    pass


@dataclass
class Report:
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def ruleset_for(inpod: bool, cfg: RedirectConfig) -> RuleSet:
    return inpod_ruleset(cfg) if inpod else node_ruleset(cfg)


def install(*, inpod: bool = False, cfg: RedirectConfig = DEFAULT_CONFIG, allow_nft: bool = False) -> Report:
    rs = ruleset_for(inpod, cfg)
    report = Report()
    refusal, report.warnings = iptables.backend_problem(iptables.probe_backends(), allow_nft=allow_nft)
    if refusal:
        raise RedirectError(refusal)
    try:
        if rs.ipset and ipset.create(rs.ipset):
            report.changes.append(f"created ipset {rs.ipset} (hash:ip)")
        if routes.ensure_rule(rs.ip_rule):
            report.changes.append(f"added ip rule {' '.join(rs.ip_rule.argv())}")
        if routes.ensure_local_route(rs.local_route):
            report.changes.append(f"added ip route {' '.join(rs.local_route.argv())}")
        report.changes += iptables.install(rs)
    except (ipset.IpsetError, routes.RouteError, iptables.IptablesError) as exc:
        raise RedirectError(str(exc)) from None
    return report


def uninstall(*, inpod: bool = False, cfg: RedirectConfig = DEFAULT_CONFIG) -> Report:
    rs = ruleset_for(inpod, cfg)
    report = Report()
    try:
        report.changes += iptables.uninstall(rs.chains)
        if routes.remove_rule(rs.ip_rule):
            report.changes.append(f"removed ip rule {' '.join(rs.ip_rule.argv())}")
        if routes.remove_local_route(rs.local_route):
            report.changes.append(f"removed ip route {' '.join(rs.local_route.argv())}")
        if rs.ipset and ipset.destroy(rs.ipset):
            report.changes.append(f"destroyed ipset {rs.ipset}")
    except (ipset.IpsetError, routes.RouteError, iptables.IptablesError) as exc:
        raise RedirectError(str(exc)) from None
    return report


def status(*, inpod: bool = False, cfg: RedirectConfig = DEFAULT_CONFIG) -> tuple[str, bool]:
    """(text, complete): the guide's views (`ipset list`, `iptables -t mangle -L ...`) plus routing."""
    rs = ruleset_for(inpod, cfg)
    present = iptables.chains_present(rs.chains)
    have_rule, have_route = routes.find_rule(rs.ip_rule), routes.has_local_route(rs.local_route)
    have_set = ipset.exists(rs.ipset) if rs.ipset else True
    missing = [f"chain {t} {c}" for t, c in rs.chains if (t, c) not in present]
    missing += [] if have_rule else ["ip rule " + " ".join(rs.ip_rule.argv())]
    missing += [] if have_route else ["ip route " + " ".join(rs.local_route.argv())]
    missing += [] if have_set else [f"ipset {rs.ipset}"]
    parts = len(rs.chains) + 2 + (1 if rs.ipset else 0)
    complete = not missing
    state = "installed" if complete else "not installed" if len(missing) == parts else "partial"
    b = iptables.probe_backends()
    lines = [f"mode: {rs.mode}",
             f"state: {state}" + ("" if complete else f" (missing: {', '.join(missing)})"),
             f"backends: iptables is {b.default}; {b.legacy_rules} legacy rule(s), {b.nft_rules} nft rule(s)"
             + (f"; nft holds {', '.join(b.nft_ours)}" if b.nft_ours else ""),
             ""]
    if rs.ipset:
        lines += [f"$ ipset list {rs.ipset}", ipset.list_text(rs.ipset).rstrip(), ""]
    for t, c in present:
        lines += [f"$ iptables-legacy -t {t} -L {c}", iptables.list_chain(t, c).rstrip(), ""]
    lines += ["$ ip rule; ip route show table " + str(rs.local_route.table), routes.show(rs.local_route).rstrip()]
    return "\n".join(lines) + "\n", complete


def sync_once(inventory: Inventory, node: str, *, cfg: RedirectConfig = DEFAULT_CONFIG,
              extra_exclude: tuple[str, ...] = ()) -> Report:
    """Make the ipset hold exactly the ambient pod IPs (IPv4) of `node`, one member at a time."""
    report = Report()
    desired = ambient_pod_ips(inventory.namespaces, inventory.pods, node,
                              inventory.exclude_namespaces + tuple(extra_exclude))
    v6 = sorted(ip for ip in desired if ":" in ip)
    if v6:
        report.warnings.append(f"IPv6 pod addresses are not redirected (ipset family inet): {', '.join(v6)}")
    desired = {ip for ip in desired if ":" not in ip}
    current = ipset.members(cfg.ipset)
    if current is None:
        raise RedirectError(f"ipset {cfg.ipset} does not exist: run `ztunnel-fast redirect install` first")
    to_add, to_remove = plan(current, desired)
    owners = {ip: f"{p.namespace}/{p.name}" for p in inventory.pods for ip in p.ips}
    try:
        for ip in to_add:
            ipset.add(cfg.ipset, ip)
            report.changes.append(f"added {ip} ({owners.get(ip, '?')})")
        for ip in to_remove:
            ipset.delete(cfg.ipset, ip)
            report.changes.append(f"removed {ip}" + (f" ({owners[ip]})" if ip in owners else ""))
    except ipset.IpsetError as exc:
        raise RedirectError(str(exc)) from None
    return report
