"""Node redirection from the state (ZTUNNEL_REDIRECTION=node): ztunnel-fast keeps the node's
ipset ``ztunnel-pods-ips`` equal to the IPs of the HBONE workloads on NODE_NAME.

Role: in a cluster there is no inventory file (redirect/selection.py): the workloads istiod sends
(or the local config file lists) say which pods of this node are in the ambient mesh.  istiod
marks them with ``tunnel_protocol: HBONE``; a pod outside the mesh is TCP.  So the set of IPs to
capture is a pure function of the state (:func:`node_member_ips`), and :class:`NodeRedirection`
applies it: the node's rules once at start when any part is missing (redirect/install.py), then
the ipset members after every state change (one at a time, as install.sync_once does).

Invariants:
- Runs in the node's network namespace (the chart's `redirection: node` sets hostNetwork).
- Members change one at a time and only by difference: an IP that stays is never removed and
  re-added, so its captured connections never see a gap.
- Changes are coalesced: while one sync runs, later states wait and only the newest is applied.
- A failed sync is logged with the reason and retried on the next state change; it never stops
  the proxy (the previous members stay).
- IPv6 workload addresses are left out (the set is family inet) and logged once per sync.
- The rules stay when ztunnel-fast exits, as istio-cni's did in Istio 1.18: removing them is
  `ztunnel-fast redirect uninstall`.
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address
from typing import Iterable

from ..state.store import ProxyState
from ..state.workload import TunnelProtocol
from . import install, ipset, iptables, routes
from .rules import RedirectConfig
from .selection import plan

log = logging.getLogger(__name__)

__all__ = ["NodeRedirection", "node_member_ips", "skipped_ipv6"]


def node_member_ips(state: ProxyState, node: str) -> frozenset[str]:
    """The IPv4 addresses the node's ipset must hold: those of the workloads on `node` that use
    HBONE (pure)."""
    return frozenset(
        str(ip)
        for w in state.workloads_on_node(node)
        if w.protocol is TunnelProtocol.HBONE
        for ip in w.workload_ips
        if isinstance(ip, IPv4Address)
    )


def skipped_ipv6(state: ProxyState, node: str) -> list[str]:
    """HBONE workload addresses on `node` that the inet set cannot hold (pure; for the log)."""
    return sorted(
        str(ip)
        for w in state.workloads_on_node(node)
        if w.protocol is TunnelProtocol.HBONE
        for ip in w.workload_ips
        if not isinstance(ip, IPv4Address)
    )


def _apply_members(name: str, desired: Iterable[str]) -> tuple[list[str], list[str]]:
    """Blocking: bring the ipset to `desired`; returns (added, removed)."""
    current = ipset.members(name)
    if current is None:
        raise install.RedirectError(f"ipset {name} does not exist (removed by someone else?)")
    to_add, to_remove = plan(current, desired)
    for ip in to_add:
        ipset.add(name, ip)
    for ip in to_remove:
        ipset.delete(name, ip)
    return to_add, to_remove


class NodeRedirection:
    """The node's rules and ipset, driven by the state.  `start` once, then `update(state)` on
    every state change (ProxyContext's state listeners call it)."""

    def __init__(self, node: str, cfg: RedirectConfig = install.DEFAULT_CONFIG):
        self.node = node
        self.cfg = cfg
        self.syncs = 0  # completed syncs, for tests and logs
        self._latest: ProxyState | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self, state: ProxyState) -> None:
        """Install the node rules if any part is missing, apply `state`, then follow updates.
        Raises install.RedirectError when the rules cannot be installed (the process stops)."""
        await asyncio.to_thread(self._install_if_missing)
        await self._sync(state)
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="node-redirection")

    def update(self, state: ProxyState) -> None:
        self._latest = state
        self._wake.set()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _install_if_missing(self) -> None:
        try:
            _, complete = install.status(inpod=False, cfg=self.cfg)
        except (ipset.IpsetError, routes.RouteError, iptables.IptablesError) as exc:
            raise install.RedirectError(str(exc)) from None
        if complete:
            log.info("node redirection: rules and ipset %s already installed", self.cfg.ipset)
            return
        report = install.install(inpod=False, cfg=self.cfg)
        for warning in report.warnings:
            log.warning("node redirection: %s", warning)
        log.info("node redirection installed: %s", "; ".join(report.changes) or "nothing to change")

    async def _follow(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            state, self._latest = self._latest, None
            if state is not None:
                await self._sync(state)

    async def _sync(self, state: ProxyState) -> None:
        desired = node_member_ips(state, self.node)
        v6 = skipped_ipv6(state, self.node)
        if v6:
            log.warning("node redirection: IPv6 workload addresses are not redirected (ipset family inet): %s",
                        ", ".join(v6))
        try:
            added, removed = await asyncio.to_thread(_apply_members, self.cfg.ipset, desired)
        except (install.RedirectError, ipset.IpsetError) as exc:
            log.error("node redirection: ipset %s not updated, keeping its members: %s", self.cfg.ipset, exc)
            return
        self.syncs += 1
        if added or removed:
            log.info("node redirection: ipset %s now has %d members (added %s; removed %s)", self.cfg.ipset,
                     len(desired), ", ".join(added) or "none", ", ".join(removed) or "none")
