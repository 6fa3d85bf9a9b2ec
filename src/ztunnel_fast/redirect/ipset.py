"""The node's set of ambient pod IPs (``ztunnel-pods-ips``, hash:ip), through the `ipset` tool.

Role: create the set if missing, add or remove one member, list members, destroy the set.  Works
in the current network namespace, or in `netns` (``ip netns exec``); ipsets are per namespace.

Invariants:
- Members change one at a time (``add``/``del`` with ``-exist``): the set is never flushed,
  swapped or refilled, so adding or removing a pod never disturbs another pod's traffic.
- `create` never changes an existing set (``-exist``): re-installing keeps the members.
- `destroy` only succeeds once no iptables rule references the set; uninstall removes the rules
  first.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence

__all__ = ["IpsetError", "add", "create", "delete", "destroy", "exists", "list_text", "members"]

TIMEOUT_S = 30.0  # any ipset call; it only talks netlink to the kernel


class IpsetError(RuntimeError):
    pass


def _run(args: Sequence[str], netns: str | None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ipset", *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise IpsetError("the `ipset` tool is not installed (apt-get install ipset)") from None
    if check and cp.returncode != 0:
        raise IpsetError(f"{' '.join(argv)}: {cp.stderr.strip() or cp.stdout.strip()}")
    return cp


def _ipv4(ip: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip))
    except ValueError:
        raise IpsetError(f"not an IPv4 address: {ip!r} (the set is family inet)") from None


def exists(name: str, netns: str | None = None) -> bool:
    return _run(["list", "-n", name], netns, check=False).returncode == 0


def create(name: str, netns: str | None = None) -> bool:
    """Create the hash:ip set if missing; returns True when it was created now."""
    if exists(name, netns):
        return False
    _run(["create", name, "hash:ip", "family", "inet", "-exist"], netns)
    return True


def add(name: str, ip: str, netns: str | None = None) -> None:
    _run(["add", name, _ipv4(ip), "-exist"], netns)


def delete(name: str, ip: str, netns: str | None = None) -> None:
    _run(["del", name, _ipv4(ip), "-exist"], netns)


def members(name: str, netns: str | None = None) -> set[str] | None:
    """The set's members, or None when the set does not exist."""
    cp = _run(["save", name], netns, check=False)
    if cp.returncode != 0:
        return None
    out = set()
    for line in cp.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "add" and parts[1] == name:
            out.add(parts[2])
    return out


def destroy(name: str, netns: str | None = None) -> bool:
    """Destroy the set; returns False when it did not exist."""
    if not exists(name, netns):
        return False
    _run(["destroy", name], netns)
    return True


def list_text(name: str | None = None, netns: str | None = None) -> str:
    """`ipset list [name]` as the guide shows it."""
    cp = _run(["list", *([name] if name else [])], netns, check=False)
    return cp.stdout if cp.returncode == 0 else cp.stderr
