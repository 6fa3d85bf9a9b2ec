"""Policy routing for redirection: ``ip rule fwmark 0x111/0xfff lookup 100`` and
``local 0.0.0.0/0 dev lo table 100``, through iproute2 (``ip -j``).

Role: packets marked "deliver to ztunnel-fast" (TPROXY'd connections, replies to connections
ztunnel-fast dialled with a client's source IP, its HBONE to a pod of its own node) are looked up
in a table whose only route says "local", so they reach the local transparent socket instead of
being forwarded.  Works in the current network namespace, or in `netns`.

Invariants: `ensure_*` are idempotent (an identical entry is ours and left alone); `remove_*`
delete exactly the entry described, nothing else in the table; a different rule already sitting
at our priority is reported, never replaced.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

from .rules import IpRule, LocalRoute

__all__ = [
    "RouteError",
    "ensure_local_route",
    "ensure_rule",
    "find_rule",
    "has_local_route",
    "remove_local_route",
    "remove_rule",
    "show",
]

TIMEOUT_S = 30.0


class RouteError(RuntimeError):
    pass


def _ip(args: Sequence[str], netns: str | None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if check and cp.returncode != 0:
        raise RouteError(f"{' '.join(argv)}: {cp.stderr.strip()}")
    return cp


def _rules(netns: str | None) -> list[dict]:
    return json.loads(_ip(["-4", "-j", "rule", "show"], netns).stdout or "[]")


def _same(entry: dict, rule: IpRule) -> bool:
    mark = int(str(entry.get("fwmark", "0")), 0)
    mask = int(str(entry.get("fwmask", "0xffffffff")), 0)
    return (entry.get("priority") == rule.priority and mark == rule.fwmark and mask == rule.mask
            and str(entry.get("table")) == str(rule.table) and entry.get("src", "all") == "all"
            and not entry.get("not"))


def find_rule(rule: IpRule, netns: str | None = None) -> bool:
    return any(_same(e, rule) for e in _rules(netns))


def ensure_rule(rule: IpRule, netns: str | None = None) -> bool:
    """Add the rule unless it is there; True when added now."""
    entries = _rules(netns)
    if any(_same(e, rule) for e in entries):
        return False
    others = [e for e in entries if e.get("priority") == rule.priority]
    if others:
        raise RouteError(f"ip rule priority {rule.priority} is already used by {others[0]}: "
                         f"choose another --rule-priority")
    _ip(["-4", "rule", "add", *rule.argv()], netns)
    return True


def remove_rule(rule: IpRule, netns: str | None = None) -> bool:
    removed = False
    for _ in range(8):  # duplicates (a crashed earlier run): bounded
        if not find_rule(rule, netns):
            break
        _ip(["-4", "rule", "del", *rule.argv()], netns)
        removed = True
    return removed


def has_local_route(route: LocalRoute, netns: str | None = None) -> bool:
    cp = _ip(["-4", "-j", "route", "show", "table", str(route.table)], netns, check=False)
    if cp.returncode != 0:  # "FIB table does not exist": nothing in it yet
        return False
    out = json.loads(cp.stdout or "[]")
    return any(e.get("type") == "local" and e.get("dst") in ("default", "0.0.0.0/0") and e.get("dev") == "lo"
               for e in out)


def ensure_local_route(route: LocalRoute, netns: str | None = None) -> bool:
    if has_local_route(route, netns):
        return False
    _ip(["-4", "route", "add", *route.argv()], netns)
    return True


def remove_local_route(route: LocalRoute, netns: str | None = None) -> bool:
    if not has_local_route(route, netns):
        return False
    _ip(["-4", "route", "del", *route.argv()], netns)
    return True


def show(route: LocalRoute, netns: str | None = None) -> str:
    rules = _ip(["-4", "rule", "show"], netns).stdout
    table = _ip(["-4", "route", "show", "table", str(route.table)], netns, check=False).stdout
    return f"{rules}--- table {route.table}\n{table}"
