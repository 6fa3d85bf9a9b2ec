"""Live inbound connections that passed authorization, re-checked whenever policies change.

Each inbound tunnel registers what its decision was made on (the destination workload and the
ConnectionInfo) and how to close it.  On a policy update every tracked connection is evaluated
again; those now denied are closed with ztunnel's log line and error
`connection closed due to policy change`.

Invariant: a tunnel is tracked from its authorization until its completion, never longer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

from ..state.rbac import ConnectionInfo, Decision, PolicyIndex, authorize
from ..state.workload import Workload

log = logging.getLogger("ztunnel_fast.proxy.connection_manager")

POLICY_CHANGE_ERROR = "connection closed due to policy change"


@dataclass(eq=False)
class Tracked:
    workload: Workload
    info: ConnectionInfo
    task: asyncio.Task
    span: object = None
    closed_reason: str | None = field(default=None)

    def close(self, reason: str) -> None:
        """Ask the tunnel to end; its handler sees `closed_reason` and records it."""
        self.closed_reason = reason
        self.task.cancel()


class ConnectionManager:
    def __init__(self):
        self._tracked: set[Tracked] = set()

    def track(self, workload: Workload, info: ConnectionInfo, span=None, task=None) -> Tracked:
        """`task` (the current task by default) is cancelled to close the tunnel (the inbound fast
        path passes the future its tunnel completes)."""
        entry = Tracked(workload, info, task if task is not None else asyncio.current_task(), span)
        self._tracked.add(entry)
        return entry

    def untrack(self, entry: Tracked) -> None:
        self._tracked.discard(entry)

    def __len__(self) -> int:
        return len(self._tracked)

    def entries(self) -> list[Tracked]:
        """The live tracked connections (admin views such as config_dump's workloadState)."""
        return list(self._tracked)

    def reevaluate(self, index: PolicyIndex, lookup: Callable[[Workload], Workload | None]) -> int:
        """Apply a new policy snapshot to live connections; returns how many were closed."""
        closed = 0
        for entry in list(self._tracked):
            workload = lookup(entry.workload) or entry.workload
            decision: Decision = authorize(index, workload, entry.info)
            if not decision.allowed:
                log.info(
                    "connection closed because it's no longer allowed after a policy update: %s",
                    decision.reason, extra={"span": entry.span},
                )
                entry.close(POLICY_CHANGE_ERROR)
                closed += 1
        return closed
